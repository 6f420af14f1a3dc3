//! The writer's decisions, against a real file: rounds committed in order and grouped, the
//! completions resolved only after, a round not accepted ending the pipeline's checkpoints, a
//! forgotten pipeline, a drain that ends, and a damaged file refused by name.

use super::*;
use crate::pipeline::RoleChanges;
use std::sync::Mutex;

const WAIT: Duration = Duration::from_secs(10);

fn window(key: &str, start_ms: i64) -> WindowId {
    WindowId {
        key: Some(key.as_bytes().to_vec()),
        start_ms,
        end_ms: start_ms + 1000,
    }
}

fn changes(stage: &str, windows: Vec<(WindowId, Option<&str>)>) -> Vec<StateChanges> {
    vec![StateChanges {
        stage: 0,
        lane: (0, 1),
        name: stage.into(),
        current: RoleChanges {
            version: "a".repeat(64),
            layout: Some("auto:1".into()),
            max_event_ms: Some(1500),
            windows: windows
                .into_iter()
                .map(|(w, acc)| (w, acc.map(|a| a.as_bytes().to_vec())))
                .collect(),
        },
        draining: None,
    }]
}

fn position(producer: &str, next: u64) -> Vec<Position> {
    vec![Position {
        key: Arc::from(format!("quic/{producer}")),
        next,
    }]
}

/// How each completion was resolved, by round.
type Log = Arc<Mutex<Vec<(u64, Result<(), String>)>>>;

/// A completion that records how it was resolved.
fn completion(log: &Log, round: u64) -> Completion {
    let log = log.clone();
    Completion::new(move |result| log.lock().expect("log").push((round, result)))
}

fn sync(checkpoints: &Checkpoints) {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
        .block_on(async {
            tokio::time::timeout(WAIT, checkpoints.sync())
                .await
                .expect("synced");
        });
}

#[test]
fn rounds_are_committed_in_order_and_acked_only_once_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let p = checkpoints.pipeline("totals");
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let (r0, r1) = (p.next_round(), p.next_round());
    // Round 1's sinks accept first: it waits for round 0.
    p.round_done(
        r1,
        changes(
            "sum",
            vec![(window("b", 0), Some("2")), (window("a", 0), None)],
        ),
        position("p1", 2),
        Ok(()),
        vec![completion(&log, r1)],
    );
    sync(&checkpoints);
    assert!(
        log.lock().expect("log").is_empty(),
        "round 1 waits for round 0"
    );
    assert!(
        checkpoints
            .restore("totals")
            .expect("read")
            .stages
            .is_empty()
    );
    p.round_done(
        r0,
        changes("sum", vec![(window("a", 0), Some("1"))]),
        position("p1", 1),
        Ok(()),
        vec![completion(&log, r0)],
    );
    sync(&checkpoints);
    assert_eq!(*log.lock().expect("log"), [(0, Ok(())), (1, Ok(()))]);
    let restored = checkpoints.restore("totals").expect("read");
    let sum = &restored.stages["sum"];
    assert_eq!(sum.current.event_time(0, 1), Some(1500));
    assert_eq!(sum.current.meta.layout.as_deref(), Some("auto:1"));
    assert_eq!(
        sum.current.windows,
        [(window("b", 0), b"2".to_vec())],
        "a finished"
    );
    assert_eq!(restored.positions, position("p1", 2));

    // Reopened, it reads the same.
    drop(checkpoints);
    let again = Checkpoints::open(dir.path()).expect("reopened");
    assert_eq!(again.restore("totals").expect("read"), restored);
    assert_eq!(again.restore("other").expect("read"), Restored::default());
}

#[test]
fn a_round_not_accepted_ends_the_pipelines_checkpoints_and_later_rounds_are_not_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let p = checkpoints.pipeline("totals");
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    for (round, result) in [
        (0, Ok(())),
        (1, Err("a sink gave up".to_owned())),
        (2, Ok(())),
    ] {
        assert_eq!(p.next_round(), round);
        p.round_done(
            round,
            changes("sum", vec![(window("a", round as i64 * 1000), Some("1"))]),
            position("p1", round + 1),
            result,
            vec![completion(&log, round)],
        );
    }
    sync(&checkpoints);
    assert_eq!(
        *log.lock().expect("log"),
        [
            (0, Ok(())),
            (1, Err("a sink gave up".into())),
            (
                2,
                Err("not checkpointed: an earlier round of the pipeline was not accepted".into())
            )
        ]
    );
    let restored = checkpoints.restore("totals").expect("read");
    assert_eq!(restored.positions, position("p1", 1), "round 0 only");
    assert_eq!(restored.stages["sum"].current.windows.len(), 1);
}

#[test]
fn a_forgotten_pipeline_leaves_nothing_and_its_name_starts_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let old = checkpoints.pipeline("totals");
    let round = old.next_round();
    old.round_done(
        round,
        changes("sum", vec![(window("a", 0), Some("1"))]),
        position("p1", 5),
        Ok(()),
        vec![completion(&log, round)],
    );
    checkpoints.forget(&old);
    // A round of the removed pipeline resolving late: acked, nothing written.
    let late = old.next_round();
    old.round_done(
        late,
        changes("sum", vec![(window("z", 0), Some("9"))]),
        position("p1", 6),
        Ok(()),
        vec![completion(&log, late)],
    );
    sync(&checkpoints);
    assert_eq!(
        checkpoints.restore("totals").expect("read"),
        Restored::default()
    );
    let new = checkpoints.pipeline("totals");
    let round = new.next_round();
    assert_eq!(round, 0);
    new.round_done(
        round,
        changes("sum", vec![(window("b", 0), Some("2"))]),
        position("p2", 1),
        Ok(()),
        vec![completion(&log, 10)],
    );
    sync(&checkpoints);
    let restored = checkpoints.restore("totals").expect("read");
    assert_eq!(restored.positions, position("p2", 1));
    assert_eq!(
        restored.stages["sum"].current.windows,
        [(window("b", 0), b"2".to_vec())]
    );
    assert_eq!(
        *log.lock().expect("log"),
        [(0, Ok(())), (1, Ok(())), (10, Ok(()))]
    );
}

#[test]
fn a_drain_that_ends_takes_its_windows_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let p = checkpoints.pipeline("totals");
    let mut draining = changes("sum", vec![(window("new", 1000), Some("n"))]);
    draining[0].current.layout = Some("auto:2".into());
    draining[0].draining = Some(RoleChanges {
        version: "b".repeat(64),
        layout: Some("auto:1".into()),
        max_event_ms: Some(1200),
        windows: vec![(window("old", 0), Some(b"o".to_vec()))],
    });
    p.round_done(p.next_round(), draining, Vec::new(), Ok(()), Vec::new());
    sync(&checkpoints);
    let restored = checkpoints.restore("totals").expect("read");
    let sum = &restored.stages["sum"];
    assert_eq!(sum.current.windows, [(window("new", 1000), b"n".to_vec())]);
    let old = sum.draining.as_ref().expect("draining");
    assert_eq!(old.meta.version, "b".repeat(64));
    assert_eq!(old.windows, [(window("old", 0), b"o".to_vec())]);
    // The previous version is done: the next round has no draining part.
    let mut done = changes("sum", Vec::new());
    done[0].current.layout = Some("auto:2".into());
    p.round_done(p.next_round(), done, Vec::new(), Ok(()), Vec::new());
    sync(&checkpoints);
    let restored = checkpoints.restore("totals").expect("read");
    let sum = &restored.stages["sum"];
    assert_eq!(sum.draining, None);
    assert_eq!(sum.current.windows, [(window("new", 1000), b"n".to_vec())]);
}

#[test]
fn a_worker_with_no_previous_version_leaves_the_other_workers_draining_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let p = checkpoints.pipeline("totals");
    // Worker 1 finishes an old-layout window; worker 0 never had any.
    let mut one = changes("sum", vec![(window("new", 1000), Some("n"))]);
    one[0].lane = (1, 2);
    one[0].current.layout = Some("auto:2".into());
    one[0].draining = Some(RoleChanges {
        version: "b".repeat(64),
        layout: Some("auto:1".into()),
        max_event_ms: Some(1200),
        windows: vec![(window("old", 0), Some(b"o".to_vec()))],
    });
    p.round_done(p.next_round(), one, Vec::new(), Ok(()), Vec::new());
    let mut zero = changes("sum", vec![(window("new2", 1000), Some("m"))]);
    zero[0].lane = (0, 2);
    zero[0].current.layout = Some("auto:2".into());
    p.round_done(p.next_round(), zero, Vec::new(), Ok(()), Vec::new());
    sync(&checkpoints);
    let restored = checkpoints.restore("totals").expect("read");
    let old = restored.stages["sum"].draining.as_ref().expect("draining");
    assert_eq!(old.windows, [(window("old", 0), b"o".to_vec())]);
}

#[test]
fn each_worker_restarts_from_its_own_event_time_and_other_worker_counts_from_the_least() {
    let dir = tempfile::tempdir().expect("tempdir");
    let checkpoints = Checkpoints::open(dir.path()).expect("opened");
    let p = checkpoints.pipeline("totals");
    // Worker 1 of 2 is a batch ahead of worker 0 when the router stops.
    for (lane, ms) in [(0, 1500), (1, 2500)] {
        let mut round = changes("sum", Vec::new());
        round[0].lane = (lane, 2);
        round[0].current.max_event_ms = Some(ms);
        p.round_done(p.next_round(), round, Vec::new(), Ok(()), Vec::new());
    }
    sync(&checkpoints);
    let sum = &checkpoints.restore("totals").expect("read").stages["sum"];
    assert_eq!(sum.current.event_time(0, 2), Some(1500));
    assert_eq!(sum.current.event_time(1, 2), Some(2500));
    // On three workers, or one, no worker judges late what worker 0 had not reached.
    assert_eq!(sum.current.event_time(2, 3), Some(1500));
    assert_eq!(sum.current.event_time(0, 1), Some(1500));
    assert_eq!(sum.current.meta.max_event_ms, None);

    // A restart on three workers starts them from 1500: the file then holds their event times
    // only, and a worker of three that wrote none gets none, not another's (it may be ahead).
    checkpoints
        .start_event_times("totals", 3, &[("sum", 0, 0, 1500), ("sum", 0, 1, 1500)])
        .expect("written");
    let sum = &checkpoints.restore("totals").expect("read").stages["sum"];
    assert_eq!(
        sum.current.event_times,
        BTreeMap::from([((3, 0), 1500), ((3, 1), 1500)])
    );
    assert_eq!(sum.current.event_time(2, 3), None);
    assert_eq!(sum.current.event_time(1, 2), Some(1500));
}

#[test]
fn a_file_written_before_workers_kept_their_event_times_apart_gives_the_stages() {
    let state = RestoredState {
        meta: StageMeta {
            version: "a".repeat(64),
            layout: None,
            max_event_ms: Some(700),
        },
        event_times: BTreeMap::new(),
        windows: Vec::new(),
    };
    assert_eq!(state.event_time(1, 2), Some(700));
}

#[test]
fn a_file_of_format_1_is_upgraded_and_one_of_a_later_format_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write_format = |format: u32| {
        let db = Database::create(dir.path().join(FILE)).expect("a file");
        let txn = db.begin_write().expect("a transaction");
        txn.open_table(META)
            .expect("the table")
            .insert("format", &format)
            .expect("written");
        txn.commit().expect("committed");
    };
    write_format(1);
    let checkpoints = Checkpoints::open(dir.path()).expect("upgraded");
    assert_eq!(
        checkpoints.restore("totals").expect("read"),
        Restored::default()
    );
    drop(checkpoints);
    write_format(3);
    let error = Checkpoints::open(dir.path()).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("format 3, and this build reads format 2"),
        "{error}"
    );
}

#[test]
fn a_damaged_file_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(FILE);
    std::fs::write(&path, vec![0x5a; 8192]).expect("garbage");
    let error = Checkpoints::open(dir.path()).expect_err("damaged");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("checkpoint {}: ", path.display()))
            && text.ends_with(
                "; if it is damaged, move it away and start again (open windows then start empty, and the producers' unacked batches are folded into them), or put back a copy"
            ),
        "{text}"
    );
}

#[test]
fn a_truncated_file_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let checkpoints = Checkpoints::open(dir.path()).expect("opened");
        let p = checkpoints.pipeline("totals");
        let windows = (0..2000)
            .map(|i| (window(&format!("k{i}"), 0), Some("an accumulator")))
            .collect();
        p.round_done(
            p.next_round(),
            changes("sum", windows),
            Vec::new(),
            Ok(()),
            Vec::new(),
        );
        sync(&checkpoints);
    }
    let path = dir.path().join(FILE);
    let bytes = std::fs::read(&path).expect("the file");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("truncate");
    let error = Checkpoints::open(dir.path())
        .and_then(|c| c.restore("totals").map(|_| ()))
        .expect_err("truncated");
    assert!(
        error
            .to_string()
            .starts_with(&format!("checkpoint {}: ", path.display())),
        "{error}"
    );
}
