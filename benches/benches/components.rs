//! Criterion benches of each component on the tiny and small models, per backend.
//!
//! `cargo bench -p ip2p-benches` (CPU); `--features wgpu` / `--features cuda` add those backends.
//! Each measurement syncs the device, so queued GPU work is counted.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ip2p_benches::{Case, small, tiny};
use ip2p_nn::Backend;

fn bench_case<B: Backend>(c: &mut Criterion, backend: &str, case: &Case<B>) {
    let m = &case.model;
    let dev = &m.device;
    let sync = || B::sync(dev).expect("device sync");
    let mut group = c.benchmark_group(format!("{backend}/{}", case.name));
    group.sample_size(10);

    // UNet forward on the guidance batch (3 rows), as one denoising step runs it.
    let latent_ch = m.unet.in_channels / 2;
    let sample = case.latents(3, m.unet.in_channels);
    let text = m.text.as_ref().expect("text encoder");
    let context = text
        .encode(&["a prompt", "", ""])
        .expect("encode")
        .cast(m.unet.dtype());
    group.bench_function("unet_forward_b3", |b| {
        b.iter(|| {
            let out = m
                .unet
                .forward(sample.clone(), 500.0, context.clone())
                .expect("unet");
            sync();
            out
        })
    });

    let vae = m.vae.as_ref().expect("vae");
    let images = case.images(1);
    group.bench_function("vae_encode", |b| {
        b.iter(|| {
            let z = vae.encode(images.clone()).expect("encode").mode();
            sync();
            z
        })
    });
    let latents = case.latents(1, latent_ch);
    group.bench_function("vae_decode", |b| {
        b.iter(|| {
            let x = vae.decode_scaled(latents.clone()).expect("decode");
            sync();
            x
        })
    });

    // Distinct prompts each time would hit the tokenizer too; ids isolate the encoder.
    let ids = text
        .tokenizer()
        .encode_batch(&["turn the sky into a starry night"])
        .expect("tokenize")
        .into_iter()
        .map(|r| r.into_iter().map(i64::from).collect::<Vec<i64>>())
        .collect::<Vec<_>>();
    group.bench_function("text_encode_b1", |b| {
        b.iter(|| {
            let e = text.encode_ids(&ids).expect("encode");
            sync();
            e
        })
    });

    let eps = case.latents(1, latent_ch);
    let x = case.latents(1, latent_ch);
    group.bench_function("scheduler_step_euler_a", |b| {
        b.iter_batched(
            || {
                let mut s = m.scheduler(None).expect("scheduler");
                s.set_timesteps(20).expect("timesteps");
                let t = s.timesteps()[0];
                (s, t)
            },
            |(mut s, t)| {
                let out = s.step(eps.clone(), t, x.clone(), None).expect("step");
                sync();
                out.prev_sample
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn run_backend<B: Backend>(c: &mut Criterion, backend: &str, device: &B::Device) {
    for case in [tiny::<B>(device), small::<B>(device)] {
        match case {
            Ok(case) => bench_case(c, backend, &case),
            Err(e) => eprintln!("{backend}: model did not build: {e}"),
        }
    }
}

fn components(c: &mut Criterion) {
    #[cfg(feature = "flex")]
    run_backend::<burn::backend::Flex>(c, "cpu", &Default::default());
    #[cfg(feature = "wgpu")]
    run_backend::<burn::backend::Wgpu>(c, "wgpu", &Default::default());
    #[cfg(feature = "cuda")]
    run_backend::<burn::backend::Cuda>(c, "cuda", &Default::default());
}

criterion_group!(benches, components);
criterion_main!(benches);
