//! Shard selection: accelerate's split, batch groups, and which environment wins.

use std::collections::HashMap;

use ip2p_dataset::{DatasetError, Shard, ShardSource, groups, split_between_processes};

/// `PartialState().split_between_processes(list(range(length)))` for each process, printed by
/// accelerate 1.15.0 itself (the fixture venv's), with `PartialState._shared_state`'s
/// `num_processes` and `process_index` set to each case in turn.
const ACCELERATE: &[((usize, usize), &[&str])] = &[
    ((0, 1), &["empty"]),
    ((1, 1), &["0..1"]),
    ((8, 1), &["0..8"]),
    ((8, 2), &["0..4", "4..8"]),
    ((8, 3), &["0..3", "3..6", "6..8"]),
    ((7, 3), &["0..3", "3..5", "5..7"]),
    ((10, 4), &["0..3", "3..6", "6..8", "8..10"]),
    ((3, 5), &["0..1", "1..2", "2..3", "empty", "empty"]),
    ((5, 5), &["0..1", "1..2", "2..3", "3..4", "4..5"]),
    (
        (100, 7),
        &[
            "0..15", "15..30", "30..44", "44..58", "58..72", "72..86", "86..100",
        ],
    ),
    ((1, 2), &["0..1", "empty"]),
    (
        (13, 8),
        &[
            "0..2", "2..4", "4..6", "6..8", "8..10", "10..11", "11..12", "12..13",
        ],
    ),
];

#[test]
fn split_is_accelerates() {
    for ((len, n), want) in ACCELERATE {
        for (i, w) in want.iter().enumerate() {
            let r = split_between_processes(*len, *n, i);
            let got = if r.is_empty() {
                "empty".to_string()
            } else {
                format!("{}..{}", r.start, r.end)
            };
            assert_eq!(&got, w, "length {len}, {n} processes, process {i}");
        }
    }
}

#[test]
fn shards_cover_the_manifest_once_in_whole_groups() {
    for len in 0..40 {
        for batch in 1..6 {
            for count in 1..7 {
                let mut next = 0;
                for index in 0..count {
                    let s = Shard {
                        index,
                        count,
                        source: ShardSource::Flags,
                    };
                    let r = s.items(len, batch);
                    assert_eq!(r.start, next, "len {len} batch {batch} {index}/{count}");
                    assert!(
                        r.is_empty()
                            || (r.start.is_multiple_of(batch)
                                && (r.end.is_multiple_of(batch) || r.end == len))
                    );
                    let gs = groups(r.clone(), batch);
                    assert!(gs.iter().all(|g| g.start / batch == (g.end - 1) / batch));
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
    // With --batch 1, a shard's items are accelerate's split of the items.
    let s = Shard {
        index: 1,
        count: 3,
        source: ShardSource::Flags,
    };
    assert_eq!(s.items(8, 1), 3..6);
    // Groups of 3 over 8 items, 2 shards: groups {0,1,2}{3,4,5} and {6,7}.
    let s0 = Shard {
        index: 0,
        count: 2,
        source: ShardSource::Flags,
    };
    let s1 = Shard {
        index: 1,
        count: 2,
        source: ShardSource::Flags,
    };
    assert_eq!((s0.items(8, 3), s1.items(8, 3)), (0..6, 6..8));
    assert_eq!(groups(0..6, 3), vec![0..3, 3..6]);
}

fn resolve(
    index: Option<usize>,
    count: Option<usize>,
    env: &[(&str, &str)],
) -> Result<Shard, DatasetError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Shard::resolve(index, count, |k| env.get(k).cloned())
}

fn ok(
    index: Option<usize>,
    count: Option<usize>,
    env: &[(&str, &str)],
) -> (usize, usize, ShardSource) {
    let s = resolve(index, count, env).unwrap();
    (s.index, s.count, s.source)
}

fn err(index: Option<usize>, count: Option<usize>, env: &[(&str, &str)]) -> String {
    match resolve(index, count, env) {
        Err(DatasetError::Shard(m)) => m,
        other => panic!("expected a shard error, got {other:?}"),
    }
}

#[test]
fn environment_precedence() {
    use ShardSource::*;
    let all = [
        ("JOB_COMPLETION_INDEX", "1"),
        ("SLURM_ARRAY_TASK_ID", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
        ("RANK", "3"),
        ("WORLD_SIZE", "5"),
    ];
    // Flags beat every environment.
    assert_eq!(ok(Some(0), Some(2), &all), (0, 2, Flags));
    // Then Kubernetes (its count from --num-shards), Slurm, torchrun.
    assert_eq!(ok(None, Some(6), &all), (1, 6, KubernetesIndexedJob));
    assert_eq!(ok(None, None, &all[1..]), (2, 4, SlurmArray));
    assert_eq!(ok(None, None, &all[3..]), (3, 5, TorchRun));
    assert_eq!(ok(None, None, &[]), (0, 1, Single));
    assert_eq!(ok(None, Some(1), &[]), (0, 1, Flags));
    // Blank variables count as unset.
    assert_eq!(
        ok(None, None, &[("RANK", ""), ("WORLD_SIZE", "")]),
        (0, 1, Single)
    );
    // Slurm arrays that do not start at 0 or step by more than 1.
    let arr = [
        ("SLURM_ARRAY_TASK_ID", "7"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_STEP", "2"),
    ];
    assert_eq!(ok(None, None, &arr), (3, 4, SlurmArray));
}

#[test]
fn bad_shard_selections_say_what_is_wrong() {
    assert!(err(Some(0), None, &[]).contains("--shard-index needs --num-shards"));
    assert!(err(Some(2), Some(2), &[]).contains("shard index 2 is not below"));
    assert!(err(None, None, &[("JOB_COMPLETION_INDEX", "0")]).contains("--num-shards"));
    assert!(err(None, Some(3), &[]).contains("without --shard-index"));
    assert!(err(None, None, &[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\" is not"));
    assert!(err(None, None, &[("RANK", "0")]).contains("without WORLD_SIZE"));
    assert!(
        err(None, Some(3), &[("RANK", "0"), ("WORLD_SIZE", "2")])
            .contains("--num-shards 3 disagrees with WORLD_SIZE=2")
    );
    assert!(
        err(
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4")
            ]
        )
        .contains("not below")
    );
    assert!(err(Some(0), Some(0), &[]).contains("at least 1"));
}
