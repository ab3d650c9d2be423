//! Loading scheduler configs, choosing schedulers by name, and the typed errors of bad input.

use burn::tensor::{Tensor, TensorData};
use ip2p_nn::testing::fixtures_dir;
use ip2p_sched::{SchedError, SchedulerConfig, SchedulerKind, TimestepSpacing, build};

type B = burn::backend::Flex;

fn tiny_config() -> SchedulerConfig {
    SchedulerConfig::from_file(fixtures_dir().join("models/tiny/scheduler/scheduler_config.json"))
        .unwrap()
}

fn json(text: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(text).unwrap()
}

fn latents(value: f32) -> Tensor<B, 4> {
    Tensor::from_data(
        TensorData::new(vec![value; 2 * 4 * 3 * 2], [2, 4, 3, 2]),
        &Default::default(),
    )
}

#[test]
fn the_model_folder_gives_euler_ancestral_linspace() {
    let cfg = tiny_config();
    assert_eq!(cfg.kind().unwrap(), SchedulerKind::EulerAncestral);
    assert_eq!(
        cfg.base(SchedulerKind::EulerAncestral)
            .unwrap()
            .timestep_spacing,
        TimestepSpacing::Linspace
    );
    let mut s = build::<B>(&cfg, None).unwrap();
    assert_eq!(s.kind(), SchedulerKind::EulerAncestral);
    s.set_timesteps(100).unwrap();
    // linspace: init_noise_sigma is the largest sigma itself (sqrt(max² + 1) only for leading).
    let sigma_max = s.sigmas().unwrap()[0];
    assert!((sigma_max - 14.6146).abs() < 1e-4, "{sigma_max}");
    assert_eq!(s.init_noise_sigma(), sigma_max);
    assert_eq!(s.timesteps().len(), 100);
    assert_eq!(s.timesteps()[0], 999.0);
    assert_eq!(*s.timesteps().last().unwrap(), 0.0);
}

#[test]
fn other_classes_take_the_folder_keys_and_their_own_defaults() {
    let cfg = tiny_config();
    // No timestep_spacing in the file: DDIM and DDPM default to leading, the others to linspace.
    for (kind, spacing) in [
        (SchedulerKind::Euler, TimestepSpacing::Linspace),
        (SchedulerKind::Ddim, TimestepSpacing::Leading),
        (SchedulerKind::Ddpm, TimestepSpacing::Leading),
        (SchedulerKind::DpmSolverMultistep, TimestepSpacing::Linspace),
    ] {
        assert_eq!(cfg.base(kind).unwrap().timestep_spacing, spacing, "{kind}");
        let mut s = build::<B>(&cfg, Some(kind)).unwrap();
        assert_eq!(s.kind(), kind);
        s.set_timesteps(20).unwrap();
        assert_eq!(s.timesteps().len(), 20);
    }
    // DDIM leading with steps_offset 1: 951, 901, ..., 1.
    let mut s = build::<B>(&cfg, Some(SchedulerKind::Ddim)).unwrap();
    s.set_timesteps(20).unwrap();
    assert_eq!(s.timesteps()[0], 951.0);
    assert_eq!(*s.timesteps().last().unwrap(), 1.0);
}

#[test]
fn schedulers_are_found_by_short_and_class_name() {
    for kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(kind.short_name()).unwrap(), kind);
        assert_eq!(SchedulerKind::from_name(kind.class_name()).unwrap(), kind);
        assert_eq!(kind.short_name().parse::<SchedulerKind>().unwrap(), kind);
    }
    assert_eq!(
        SchedulerKind::from_name("DPM++").unwrap(),
        SchedulerKind::DpmSolverMultistep
    );
    assert!(
        matches!(SchedulerKind::from_name("heun"), Err(SchedError::UnknownClass(n)) if n == "heun")
    );
}

#[test]
fn unknown_class_is_a_typed_error() {
    let cfg = json(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#);
    assert!(matches!(cfg.kind(), Err(SchedError::UnknownClass(n)) if n == "PNDMScheduler"));
    assert!(matches!(
        build::<B>(&cfg, None),
        Err(SchedError::UnknownClass(_))
    ));
    // Chosen by name, the same file builds (PNDM's own keys are ignored, as diffusers does).
    assert!(build::<B>(&cfg, Some(SchedulerKind::Ddim)).is_ok());
}

#[test]
fn the_broken_fixture_is_a_typed_error() {
    let path = fixtures_dir().join("broken/scheduler_wrong_value.json");
    let cfg = SchedulerConfig::from_file(&path).unwrap();
    for kind in SchedulerKind::ALL {
        match build::<B>(&cfg, Some(kind)) {
            Err(SchedError::Unsupported { field, value, .. }) => {
                assert_eq!(field, "beta_schedule");
                assert_eq!(value, "\"cosine-ish\"");
            }
            other => panic!("{kind}: expected Unsupported, got {:?}", other.err()),
        }
    }
}

#[test]
fn unsupported_values_are_typed_errors() {
    let cases = [
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "sometimes"}"#,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow"}"#,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}"#,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": true}"#,
            "use_beta_sigmas",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
            "interpolation_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "one"}"#,
            "final_sigmas_type",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#,
            "thresholding",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": true}"#,
            "rescale_betas_zero_snr",
        ),
        (
            r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_range"}"#,
            "variance_type",
        ),
        (
            r#"{"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}"#,
            "beta_schedule",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
            "algorithm_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}"#,
            "solver_order",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_type": "rk4"}"#,
            "solver_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": true}"#,
            "use_lu_lambdas",
        ),
    ];
    for (text, expected_field) in cases {
        match build::<B>(&json(text), None) {
            Err(SchedError::Unsupported { field, .. }) => {
                assert_eq!(field, expected_field, "{text}")
            }
            other => panic!("{text}: expected Unsupported, got {:?}", other.err()),
        }
    }
    let both = json(
        r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true, "use_exponential_sigmas": true}"#,
    );
    assert!(matches!(
        build::<B>(&both, None),
        Err(SchedError::InvalidConfig { .. })
    ));
}

#[test]
fn ill_typed_files_name_the_file() {
    let dir = std::env::temp_dir().join(format!("ip2p-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": "many"}"#,
    )
    .unwrap();
    let err = SchedulerConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, SchedError::Load(_)), "{err:?}");
    assert!(err.to_string().contains("scheduler_config.json"), "{err}");
    assert!(matches!(
        SchedulerConfig::from_file(dir.join("missing.json")),
        Err(SchedError::Load(_))
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn python_infinity_reads_as_no_clipping() {
    let cfg =
        json(r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}"#);
    let mut s = build::<B>(&cfg, None).unwrap();
    s.set_timesteps(20).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
}

#[test]
fn bad_step_counts_are_typed_errors() {
    let cfg = tiny_config();
    for kind in SchedulerKind::ALL {
        let mut s = build::<B>(&cfg, Some(kind)).unwrap();
        assert!(
            matches!(s.set_timesteps(0), Err(SchedError::ZeroSteps)),
            "{kind}"
        );
        assert!(
            matches!(
                s.set_timesteps(1001),
                Err(SchedError::TooManySteps {
                    steps: 1001,
                    train: 1000
                })
            ),
            "{kind}"
        );
        s.set_timesteps(1000).unwrap();
    }
}

#[test]
fn timesteps_outside_the_schedule_are_typed_errors() {
    let cfg = tiny_config();
    let x = latents(0.1);
    for kind in SchedulerKind::ALL {
        let mut s = build::<B>(&cfg, Some(kind)).unwrap();
        s.set_timesteps(4).unwrap();
        let err = s.step(x.clone(), 500.5, x.clone(), None).unwrap_err();
        assert!(
            matches!(
                err,
                SchedError::TimestepNotInSchedule { .. } | SchedError::TimestepOutOfRange { .. }
            ),
            "{kind}: {err:?}"
        );
        if !matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm) {
            assert!(s.scale_model_input(x.clone(), 3.0).is_err(), "{kind}");
            assert!(s.add_noise(x.clone(), x.clone(), &[3.0]).is_err(), "{kind}");
        }
    }
    // Training-range add_noise (DDPM, DDIM): any integer in 0..1000, nothing else.
    let s = build::<B>(&cfg, Some(SchedulerKind::Ddpm)).unwrap();
    assert!(s.add_noise(x.clone(), x.clone(), &[0.0, 999.0]).is_ok());
    assert!(matches!(
        s.add_noise(x.clone(), x.clone(), &[1000.0]),
        Err(SchedError::TimestepOutOfRange { .. })
    ));
    assert!(matches!(
        s.add_noise(x.clone(), x.clone(), &[1.0, 2.0, 3.0]),
        Err(SchedError::TimestepCount { count: 3, batch: 2 })
    ));
}

#[test]
fn steps_before_set_timesteps_and_bad_shapes_are_typed_errors() {
    let cfg = tiny_config();
    let x = latents(0.1);
    for kind in [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::DpmSolverMultistep,
    ] {
        let mut s = build::<B>(&cfg, Some(kind)).unwrap();
        assert!(
            matches!(
                s.step(x.clone(), 999.0, x.clone(), None),
                Err(SchedError::NoSchedule)
            ),
            "{kind}"
        );
    }
    let mut s = build::<B>(&cfg, None).unwrap();
    s.set_timesteps(4).unwrap();
    let wrong = Tensor::<B, 4>::zeros([1, 4, 3, 2], &Default::default());
    let t = s.timesteps()[0];
    assert!(matches!(
        s.step(wrong.clone(), t, x.clone(), None),
        Err(SchedError::Shape { .. })
    ));
    assert!(matches!(
        s.step(x.clone(), t, x.clone(), Some(wrong)),
        Err(SchedError::Shape { .. })
    ));
}

#[test]
fn seeded_noise_is_reproducible() {
    let cfg = tiny_config();
    let run = |seed| {
        let mut s = build::<B>(&cfg, None).unwrap();
        s.set_noise_seed(seed);
        s.set_timesteps(4).unwrap();
        let mut x = latents(1.0);
        for t in s.timesteps().to_vec() {
            x = s.step(latents(0.1), t, x, None).unwrap().prev_sample;
        }
        x.into_data().to_vec::<f32>().unwrap()
    };
    let (a, b, c) = (run(7), run(7), run(8));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn ddim_eta_must_be_non_negative() {
    let cfg = tiny_config();
    let s = ip2p_sched::Ddim::new(&cfg).unwrap();
    assert!(matches!(
        s.clone().with_eta(-0.1),
        Err(SchedError::BadEta(_))
    ));
    assert!(matches!(
        s.clone().with_eta(f64::NAN),
        Err(SchedError::BadEta(_))
    ));
    assert_eq!(s.with_eta(0.5).unwrap().eta(), 0.5);
}
