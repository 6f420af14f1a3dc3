//! Durable aggregate state: each checkpointed pipeline's window state (every open window's
//! accumulator, event time, the version that wrote them) and its sources' positions (where
//! each producer resumes), kept in `DATA_DIR/checkpoints.redb` (redb: copy-on-write B-trees,
//! checksummed, crash-safe commits), so that a crash loses no open window and a restart folds
//! no event twice.
//!
//! Decisions:
//!
//! - **Committed before the round is acked, after its sinks accepted it.** A worker hands each
//!   round's changes (the windows it wrote or finished, the positions it reached) to the
//!   round's ticket; once the sinks accepted the round (its window results delivered), the
//!   writer thread commits the changes and only then resolves the round's completions, which
//!   ack. So what a checkpoint holds is exactly the rounds whose output was delivered: after a
//!   crash the sources resume from the positions it holds (a resend of what it covers is
//!   dropped as a duplicate), into the windows it holds, and the results of the rounds after it
//!   are computed again from the same events — delivered twice at worst, never different, never
//!   lost.
//! - **In round order, grouped.** Rounds of one pipeline may be accepted out of order (one
//!   sink is slower); the writer commits them in order, at most one commit every 10 ms, every
//!   round ready by then in one transaction: one `fsync`, and each window written once however
//!   many of its rounds folded into it. Acks wait up to 10 ms longer for it.
//! - **Only what changed**: the windows a round wrote or finished
//!   ([`crate::pipeline::WindowState::take_changes`]), not the whole state.
//! - **A round not accepted** (only while stopping) ends the pipeline's checkpoints: nothing
//!   after it is committed (the sources resume from before it after a restart).
//! - **A damaged file** is an error naming it and what to do, never a silent reset; so is a
//!   checkpoint whose windows the serving plugin version cannot read (`topology`).

use crate::pipeline::{Completion, Position, RoleChanges, StateChanges, WindowId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// The file under the data directory.
pub const FILE: &str = "checkpoints.redb";
/// The layout of the tables this build writes and reads: 2 keeps each worker's event time
/// ([`EVENT_TIMES`]); a file of format 1 (one event time per stage) is read and upgraded.
const FORMAT: u32 = 2;
/// The least time from one commit to the next: the rounds that come meanwhile join the next
/// one (a window they all wrote is written once, one `fsync` for all), for at most that much
/// more time before their acks.
const COMMIT_EVERY: Duration = Duration::from_millis(10);
/// Commit attempts before a stopping router gives up on a failing disk.
const STOPPING_ATTEMPTS: u32 = 3;

/// (pipeline, stage, end, start, key) → (layout, accumulator).
type WindowKey<'a> = (&'a str, &'a str, i64, i64, Option<&'a [u8]>);
const WINDOWS: TableDefinition<WindowKey<'static>, (&str, &[u8])> = TableDefinition::new("windows");
/// (pipeline, stage, role: 0 serving, 1 draining) → [`StageMeta`] (postcard).
const STAGES: TableDefinition<(&str, &str, u8), &[u8]> = TableDefinition::new("stages");
/// (pipeline, stage, role, workers, worker) → that worker's event time: workers of one
/// pipeline reach each batch's event time one after the other, and a worker restarts from its
/// own (see [`RestoredState::event_time`]).
const EVENT_TIMES: TableDefinition<(&str, &str, u8, u32, u32), i64> =
    TableDefinition::new("event_times");
/// (pipeline, position key) → where that source resumes.
const POSITIONS: TableDefinition<(&str, &str), u64> = TableDefinition::new("positions");
/// "format" → [`FORMAT`].
const META: TableDefinition<&str, u32> = TableDefinition::new("meta");

/// What a checkpoint knows of one version of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMeta {
    /// The version's digest (64 hex digits).
    pub version: String,
    /// The layout id of its accumulators.
    pub layout: Option<String>,
    /// Its event time, in a file written before each worker's was kept apart
    /// ([`EVENT_TIMES`]); `None` in files written since.
    pub max_event_ms: Option<i64>,
}

/// One version's windows as a checkpoint holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredState {
    /// The version, its layout and (in an older file) event time.
    pub meta: StageMeta,
    /// Each worker's event time, by (workers, worker).
    pub event_times: BTreeMap<(usize, usize), i64>,
    /// Its open windows and their accumulators.
    pub windows: Vec<(WindowId, Vec<u8>)>,
}

impl RestoredState {
    /// The event time worker `lane` of `lanes` restarts from: its own, when it wrote one;
    /// else, when the pipeline last ran on another number of workers, the least any of them
    /// reached (its keys were some of theirs, and an event none of them judged late yet is not
    /// late); else, in a file of format 1, the stage's; else none (it folded nothing yet).
    /// Never another worker's of the same count: that one may be batches ahead.
    pub fn event_time(&self, lane: usize, lanes: usize) -> Option<i64> {
        self.event_times
            .get(&(lanes, lane))
            .or_else(|| {
                self.event_times
                    .iter()
                    .filter(|((n, _), _)| *n != lanes)
                    .map(|(_, ms)| ms)
                    .min()
            })
            .copied()
            .or(self.meta.max_event_ms)
    }
}

/// One aggregate stage as a checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredStage {
    /// The version serving.
    pub current: RestoredState,
    /// The previous version finishing the windows it opened before a layout change.
    pub draining: Option<RestoredState>,
}

/// A pipeline as a checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    /// Its aggregate stages, by name.
    pub stages: BTreeMap<String, RestoredStage>,
    /// Where its sources resume.
    pub positions: Vec<Position>,
}

/// Why the checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file cannot be opened or read.
    #[error(
        "checkpoint {path}: {message}; if it is damaged, move it away and start again (open windows then start empty, and the producers' unacked batches are folded into them), or put back a copy"
    )]
    Unreadable {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// One round's changes, waiting for its sinks and its turn.
struct RoundMessage {
    lineage: u64,
    pipeline: Arc<str>,
    round: u64,
    changes: Vec<StateChanges>,
    positions: Vec<Position>,
    result: Result<(), String>,
    completions: Vec<Completion>,
}

enum Message {
    Round(Box<RoundMessage>),
    /// Delete everything of the pipeline; later rounds of the lineage commit nothing.
    Forget {
        lineage: u64,
        pipeline: Arc<str>,
    },
    /// Answer once everything sent before is committed (or given up).
    Sync(tokio::sync::oneshot::Sender<()>),
    /// Commit what is ready and end: the file is closed.
    Close,
}

/// The router's checkpoints: the file, and the thread that writes it.
pub struct Checkpoints {
    path: PathBuf,
    db: Arc<Database>,
    tx: mpsc::Sender<Message>,
    lineages: AtomicU64,
    stopping: Arc<AtomicBool>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A checkpointed pipeline's way to hand its rounds to the writer; a pipeline that replaces
/// it (a reload restarting it) goes on with the same one, so rounds stay in order.
#[derive(Clone)]
pub struct PipelineCheckpoint {
    pipeline: Arc<str>,
    lineage: u64,
    rounds: Arc<AtomicU64>,
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for PipelineCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineCheckpoint")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl PipelineCheckpoint {
    /// Numbers a round: rounds are committed in this order.
    pub fn next_round(&self) -> u64 {
        self.rounds.fetch_add(1, Ordering::AcqRel)
    }

    /// Round `round` ended with `result` (`Ok`: its sinks accepted it): its changes are
    /// committed in turn, then `completions` resolved. Never blocks.
    pub fn round_done(
        &self,
        round: u64,
        changes: Vec<StateChanges>,
        positions: Vec<Position>,
        result: Result<(), String>,
        completions: Vec<Completion>,
    ) {
        let message = Message::Round(Box::new(RoundMessage {
            lineage: self.lineage,
            pipeline: self.pipeline.clone(),
            round,
            changes,
            positions,
            result,
            completions,
        }));
        if let Err(mpsc::SendError(Message::Round(m))) = self.tx.send(message) {
            // The writer is gone (the router is stopping): nothing can be committed.
            for completion in m.completions {
                completion.resolve(Err("the checkpoint writer has stopped".into()));
            }
        }
    }
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Unreadable {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl Checkpoints {
    /// Opens (or creates) `DATA_DIR/checkpoints.redb` and starts its writer thread.
    pub fn open(data_dir: &Path) -> Result<Arc<Checkpoints>, CheckpointError> {
        let path = data_dir.join(FILE);
        let db = Database::create(&path).map_err(|e| unreadable(&path, e))?;
        let txn = db.begin_write().map_err(|e| unreadable(&path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| unreadable(&path, e))?;
            let format = meta
                .get("format")
                .map_err(|e| unreadable(&path, e))?
                .map(|v| v.value());
            match format {
                None | Some(1) => {
                    meta.insert("format", &FORMAT)
                        .map_err(|e| unreadable(&path, e))?;
                }
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(unreadable(
                        &path,
                        format!("format {other}, and this build reads format {FORMAT}"),
                    ));
                }
            }
            txn.open_table(WINDOWS).map_err(|e| unreadable(&path, e))?;
            txn.open_table(STAGES).map_err(|e| unreadable(&path, e))?;
            txn.open_table(EVENT_TIMES)
                .map_err(|e| unreadable(&path, e))?;
            txn.open_table(POSITIONS)
                .map_err(|e| unreadable(&path, e))?;
        }
        txn.commit().map_err(|e| unreadable(&path, e))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.clone(),
            db: db.clone(),
            stopping: stopping.clone(),
            lineages: HashMap::new(),
        };
        let writer = std::thread::Builder::new()
            .name("weir-checkpoints".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| unreadable(&path, format!("cannot start its writer thread: {e}")))?;
        Ok(Arc::new(Checkpoints {
            path,
            db,
            tx,
            lineages: AtomicU64::new(0),
            stopping,
            writer: std::sync::Mutex::new(Some(writer)),
        }))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the checkpoint holds of `pipeline`.
    pub fn restore(&self, pipeline: &str) -> Result<Restored, CheckpointError> {
        let path = &self.path;
        let txn = self.db.begin_read().map_err(|e| unreadable(path, e))?;
        let stages = txn.open_table(STAGES).map_err(|e| unreadable(path, e))?;
        let mut metas: BTreeMap<(String, u8), StageMeta> = BTreeMap::new();
        for row in stages
            .range((pipeline, "", 0u8)..)
            .map_err(|e| unreadable(path, e))?
        {
            let (key, value) = row.map_err(|e| unreadable(path, e))?;
            let (p, stage, role) = key.value();
            if p != pipeline {
                break;
            }
            let meta: StageMeta = postcard::from_bytes(value.value())
                .map_err(|e| unreadable(path, format!("pipeline `{p}`, stage `{stage}`: {e}")))?;
            metas.insert((stage.to_owned(), role), meta);
        }
        let mut restored = Restored::default();
        let mut times: BTreeMap<(String, u8), BTreeMap<(usize, usize), i64>> = BTreeMap::new();
        let event_times = txn
            .open_table(EVENT_TIMES)
            .map_err(|e| unreadable(path, e))?;
        for row in event_times
            .range((pipeline, "", 0u8, 0u32, 0u32)..)
            .map_err(|e| unreadable(path, e))?
        {
            let (key, value) = row.map_err(|e| unreadable(path, e))?;
            let (p, stage, role, lanes, lane) = key.value();
            if p != pipeline {
                break;
            }
            times
                .entry((stage.to_owned(), role))
                .or_default()
                .insert((lanes as usize, lane as usize), value.value());
        }
        for ((stage, role), meta) in &metas {
            let state = RestoredState {
                meta: meta.clone(),
                event_times: times.remove(&(stage.clone(), *role)).unwrap_or_default(),
                windows: Vec::new(),
            };
            let entry = restored
                .stages
                .entry(stage.clone())
                .or_insert_with(|| RestoredStage {
                    current: state.clone(),
                    draining: None,
                });
            match role {
                0 => entry.current = state,
                _ => entry.draining = Some(state),
            }
        }
        let windows = txn.open_table(WINDOWS).map_err(|e| unreadable(path, e))?;
        let start: WindowKey<'_> = (pipeline, "", i64::MIN, i64::MIN, None);
        for row in windows.range(start..).map_err(|e| unreadable(path, e))? {
            let (key, value) = row.map_err(|e| unreadable(path, e))?;
            let (p, stage, end_ms, start_ms, key) = key.value();
            if p != pipeline {
                break;
            }
            let (layout, acc) = value.value();
            let id = WindowId {
                key: key.map(<[u8]>::to_vec),
                start_ms,
                end_ms,
            };
            let Some(entry) = restored.stages.get_mut(stage) else {
                return Err(unreadable(
                    path,
                    format!(
                        "pipeline `{p}`: windows of stage `{stage}`, which it has no record of"
                    ),
                ));
            };
            let layout = (!layout.is_empty()).then_some(layout);
            let state = match &mut entry.draining {
                Some(d)
                    if d.meta.layout.as_deref() == layout
                        && entry.current.meta.layout.as_deref() != layout =>
                {
                    d
                }
                _ => &mut entry.current,
            };
            state.windows.push((id, acc.to_vec()));
        }
        let positions = txn.open_table(POSITIONS).map_err(|e| unreadable(path, e))?;
        for row in positions
            .range((pipeline, "")..)
            .map_err(|e| unreadable(path, e))?
        {
            let (key, value) = row.map_err(|e| unreadable(path, e))?;
            let (p, source) = key.value();
            if p != pipeline {
                break;
            }
            restored.positions.push(Position {
                key: Arc::from(source),
                next: value.value(),
            });
        }
        Ok(restored)
    }

    /// Replaces `pipeline`'s event times with those its workers start from (`lanes` workers;
    /// per stage, role and worker), at a start from the checkpoint: from then on the file holds
    /// the event times of this run's workers only, not those of an earlier run on another
    /// number of workers (stale, once this run folds further).
    pub fn start_event_times(
        &self,
        pipeline: &str,
        lanes: usize,
        times: &[(&str, u8, usize, i64)],
    ) -> Result<(), CheckpointError> {
        let path = &self.path;
        let fail = |e: redb::Error| unreadable(path, e);
        let txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut table = txn.open_table(EVENT_TIMES).map_err(|e| fail(e.into()))?;
            let mut stale: Vec<(String, u8, u32, u32)> = Vec::new();
            for row in table
                .range((pipeline, "", 0u8, 0u32, 0u32)..)
                .map_err(|e| fail(e.into()))?
            {
                let (key, _) = row.map_err(|e| fail(e.into()))?;
                let (p, stage, role, n, w) = key.value();
                if p != pipeline {
                    break;
                }
                stale.push((stage.to_owned(), role, n, w));
            }
            for (stage, role, n, w) in &stale {
                table
                    .remove((pipeline, stage.as_str(), *role, *n, *w))
                    .map_err(|e| fail(e.into()))?;
            }
            // Worker counts are at most MAX_WORKERS.
            for &(stage, role, lane, ms) in times {
                table
                    .insert((pipeline, stage, role, lanes as u32, lane as u32), ms)
                    .map_err(|e| fail(e.into()))?;
            }
        }
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(())
    }

    /// A handle for a new pipeline `pipeline` (a reload restarting one passes the old handle
    /// on instead).
    pub fn pipeline(&self, pipeline: &str) -> PipelineCheckpoint {
        PipelineCheckpoint {
            pipeline: Arc::from(pipeline),
            lineage: self.lineages.fetch_add(1, Ordering::AcqRel),
            rounds: Arc::new(AtomicU64::new(0)),
            tx: self.tx.clone(),
        }
    }

    /// Deletes everything of the pipeline `handle` belongs to (a reload removed it): later
    /// rounds of it resolve without being committed.
    pub fn forget(&self, handle: &PipelineCheckpoint) {
        let _ = self.tx.send(Message::Forget {
            lineage: handle.lineage,
            pipeline: handle.pipeline.clone(),
        });
    }

    /// The router is stopping: a commit that keeps failing is given up after a few attempts
    /// instead of retried until it works.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Commits what is ready and closes the file (the writer thread ends; rounds handed over
    /// later resolve as not checkpointed). Blocks until it is closed; idempotent.
    pub fn close(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = self.tx.send(Message::Close);
            if writer.join().is_err() {
                tracing::error!(
                    "checkpoint {}: its writer thread panicked",
                    self.path.display()
                );
            }
        }
    }

    /// Completes once everything handed over before is committed (or given up).
    pub async fn sync(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Message::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Why a lineage commits nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A round was not accepted: later rounds are not acked either (their folds are not in
    /// the checkpoint, so their producers must keep them to send them again).
    Failed,
    /// The pipeline is gone: its rounds resolve as they ended.
    Forgotten,
}

/// One pipeline lineage's rounds, as the writer sees them.
#[derive(Default)]
struct Lineage {
    /// The next round to commit.
    next: u64,
    /// Rounds done and waiting for an earlier one.
    waiting: BTreeMap<u64, Box<RoundMessage>>,
    /// Set once it commits nothing more.
    ended: Option<Ended>,
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    db: Arc<Database>,
    stopping: Arc<AtomicBool>,
    lineages: HashMap<u64, Lineage>,
}

/// What one transaction does.
#[derive(Default)]
struct Batch {
    /// Rounds in the order they are resolved: each to commit, or ended (not committed).
    rounds: Vec<(RoundMessage, Option<Ended>)>,
    forget: Vec<Arc<str>>,
    syncs: Vec<tokio::sync::oneshot::Sender<()>>,
    close: bool,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Message>) {
        let mut last_commit = Instant::now();
        while let Ok(first) = rx.recv() {
            let mut batch = Batch::default();
            self.take(first, &mut batch);
            let due = last_commit + COMMIT_EVERY;
            while !batch.close {
                let wait = if batch.syncs.is_empty() {
                    due.saturating_duration_since(Instant::now())
                } else {
                    Duration::ZERO
                };
                match rx.recv_timeout(wait) {
                    Ok(more) => self.take(more, &mut batch),
                    Err(_) => break,
                }
            }
            last_commit = Instant::now();
            let Batch {
                rounds,
                forget,
                syncs,
                close,
            } = batch;
            let committing: Vec<&RoundMessage> = rounds
                .iter()
                .filter(|(_, ended)| ended.is_none())
                .map(|(round, _)| round)
                .collect();
            let result = if committing.is_empty() && forget.is_empty() {
                Ok(())
            } else {
                self.commit(&committing, &forget)
            };
            for (round, ended) in rounds {
                match ended {
                    Some(ended) => uncommitted(round, ended),
                    None => {
                        let outcome = result.clone().and(round.result);
                        for completion in round.completions {
                            completion.resolve(outcome.clone());
                        }
                    }
                }
            }
            for sync in syncs {
                let _ = sync.send(());
            }
            if close {
                return;
            }
        }
    }

    /// Files a message: rounds that are next in their lineage (and those waiting behind them)
    /// join the batch; a round not accepted ends its lineage.
    fn take(&mut self, message: Message, batch: &mut Batch) {
        match message {
            Message::Sync(reply) => batch.syncs.push(reply),
            Message::Close => batch.close = true,
            Message::Forget { lineage, pipeline } => {
                let l = self.lineages.entry(lineage).or_default();
                l.ended = Some(Ended::Forgotten);
                for (_, round) in std::mem::take(&mut l.waiting) {
                    batch.rounds.push((*round, Some(Ended::Forgotten)));
                }
                batch.forget.push(pipeline);
            }
            Message::Round(round) => {
                let l = self.lineages.entry(round.lineage).or_default();
                l.waiting.insert(round.round, round);
                while let Some(round) = l.waiting.remove(&l.next) {
                    l.next += 1;
                    if round.result.is_err() && l.ended.is_none() {
                        l.ended = Some(Ended::Failed);
                    }
                    batch.rounds.push((*round, l.ended));
                }
            }
        }
    }

    /// Commits the rounds' changes and the forgotten pipelines' deletion in one transaction,
    /// retrying a failing disk (acks wait meanwhile) until it works, or, once the router is
    /// stopping, a few times.
    fn commit(&self, rounds: &[&RoundMessage], forget: &[Arc<str>]) -> Result<(), String> {
        let mut attempt = 0u32;
        loop {
            match self.write(rounds, forget) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    let message = format!("checkpoint {}: cannot commit: {e}", self.path.display());
                    tracing::error!("{message} (attempt {attempt}; acks wait)");
                    if self.stopping.load(Ordering::Acquire) && attempt >= STOPPING_ATTEMPTS {
                        return Err(message);
                    }
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))));
                }
            }
        }
    }

    fn write(&self, rounds: &[&RoundMessage], forget: &[Arc<str>]) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut windows = txn.open_table(WINDOWS)?;
            let mut stages = Stages {
                metas: txn.open_table(STAGES)?,
                times: txn.open_table(EVENT_TIMES)?,
            };
            let mut positions = txn.open_table(POSITIONS)?;
            let draining = rounds
                .iter()
                .any(|r| r.changes.iter().any(|c| c.draining.is_some()));
            if draining {
                for round in rounds {
                    write_round(&mut windows, &mut stages, round)?;
                }
            } else {
                Latest::of(rounds).write(&mut windows, &mut stages)?;
            }
            let mut reached: HashMap<(&str, &str), u64> = HashMap::new();
            for round in rounds {
                for position in &round.positions {
                    reached.insert((&round.pipeline, &position.key), position.next);
                }
            }
            for (key, next) in reached {
                positions.insert(key, &next)?;
            }
            for pipeline in forget {
                delete_pipeline(&mut windows, &mut stages, &mut positions, pipeline)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// One round's window changes, as they come (a stage finishing its previous version's windows
/// needs the order of its rounds).
fn write_round(
    windows: &mut Windows<'_>,
    stages: &mut Stages<'_>,
    round: &RoundMessage,
) -> Result<(), redb::Error> {
    let p: &str = &round.pipeline;
    for change in &round.changes {
        let stage = change.name.as_str();
        stages.put(p, stage, 0, change.lane, &change.current)?;
        put_windows(windows, p, stage, &change.current)?;
        match &change.draining {
            Some(draining) => {
                stages.put(p, stage, 1, change.lane, draining)?;
                put_windows(windows, p, stage, draining)?;
            }
            // Other workers may still be finishing theirs: each window they finish goes as
            // it finishes.
            None if change.shared() => {}
            None => end_draining(windows, stages, p, stage)?,
        }
    }
    Ok(())
}

/// The last state of each window and stage over the rounds of one commit (none with a
/// draining version): a window folded in many of them is written once, in the table's order.
#[derive(Default)]
struct Latest<'r> {
    /// Per stage and worker: its serving version's changes.
    stages: BTreeMap<(&'r str, &'r str, (usize, usize)), &'r RoleChanges>,
    windows: BTreeMap<WindowKey<'r>, (&'r str, Option<&'r [u8]>)>,
}

impl<'r> Latest<'r> {
    fn of(rounds: &[&'r RoundMessage]) -> Self {
        let mut latest = Latest::default();
        for round in rounds {
            for change in &round.changes {
                let (p, stage) = (&*round.pipeline, change.name.as_str());
                let current = &change.current;
                latest.stages.insert((p, stage, change.lane), current);
                let layout = current.layout.as_deref().unwrap_or("");
                for (window, acc) in &current.windows {
                    latest
                        .windows
                        .insert(window_key(p, stage, window), (layout, acc.as_deref()));
                }
            }
        }
        latest
    }

    fn write(self, windows: &mut Windows<'_>, stages: &mut Stages<'_>) -> Result<(), redb::Error> {
        for ((p, stage, lane), current) in &self.stages {
            stages.put(p, stage, 0, *lane, current)?;
        }
        for (key, (layout, acc)) in self.windows {
            match acc {
                Some(acc) => {
                    windows.insert(key, (layout, acc))?;
                }
                None => {
                    windows.remove(key)?;
                }
            }
        }
        // With other workers sharing its state, a stage's previous version ends window by
        // window.
        for (p, stage, _) in self.stages.keys().filter(|(_, _, (_, lanes))| *lanes == 1) {
            end_draining(windows, stages, p, stage)?;
        }
        Ok(())
    }
}

fn window_key<'a>(pipeline: &'a str, stage: &'a str, window: &'a WindowId) -> WindowKey<'a> {
    (
        pipeline,
        stage,
        window.end_ms,
        window.start_ms,
        window.key.as_deref(),
    )
}

/// A round that is not committed. Of a forgotten pipeline: resolved as it ended. After a
/// round that was not accepted: not acked, so that its producers send it again after a
/// restart (its folds are not in the checkpoint).
fn uncommitted(round: RoundMessage, ended: Ended) {
    let result = match ended {
        Ended::Forgotten => round.result,
        Ended::Failed => round.result.and(Err(
            "not checkpointed: an earlier round of the pipeline was not accepted".to_owned(),
        )),
    };
    for completion in round.completions {
        completion.resolve(result.clone());
    }
}

type Windows<'t> = redb::Table<'t, WindowKey<'static>, (&'static str, &'static [u8])>;
/// The stages' records: each version's, and each worker's event time.
struct Stages<'t> {
    metas: redb::Table<'t, (&'static str, &'static str, u8), &'static [u8]>,
    times: redb::Table<'t, (&'static str, &'static str, u8, u32, u32), i64>,
}

impl Stages<'_> {
    /// Writes one version's record and worker `lane.0` of `lane.1`'s event time.
    fn put(
        &mut self,
        pipeline: &str,
        stage: &str,
        role: u8,
        (lane, lanes): (usize, usize),
        changes: &RoleChanges,
    ) -> Result<(), redb::Error> {
        let meta = StageMeta {
            version: changes.version.clone(),
            layout: changes.layout.clone(),
            max_event_ms: None,
        };
        // Serializing plain owned data into a Vec cannot fail.
        let bytes = postcard::to_allocvec(&meta).unwrap_or_default();
        self.metas
            .insert((pipeline, stage, role), bytes.as_slice())?;
        if let Some(ms) = changes.max_event_ms {
            // Worker counts are at most MAX_WORKERS.
            let at = (pipeline, stage, role, lanes as u32, lane as u32);
            self.times.insert(at, ms)?;
        }
        Ok(())
    }

    /// Removes one version's record and its workers' event times.
    fn remove(
        &mut self,
        pipeline: &str,
        stage: &str,
        role: u8,
    ) -> Result<Option<StageMeta>, redb::Error> {
        let meta = self
            .metas
            .remove((pipeline, stage, role))?
            .and_then(|m| postcard::from_bytes(m.value()).ok());
        let mut lanes: Vec<(u32, u32)> = Vec::new();
        for row in self.times.range((pipeline, stage, role, 0u32, 0u32)..)? {
            let (key, _) = row?;
            let (p, s, r, n, w) = key.value();
            if p != pipeline || s != stage || r != role {
                break;
            }
            lanes.push((n, w));
        }
        for (n, w) in lanes {
            self.times.remove((pipeline, stage, role, n, w))?;
        }
        Ok(meta)
    }
}

/// Writes one version's changed windows.
fn put_windows(
    windows: &mut Windows<'_>,
    pipeline: &str,
    stage: &str,
    changes: &RoleChanges,
) -> Result<(), redb::Error> {
    let layout = changes.layout.as_deref().unwrap_or("");
    for (window, acc) in &changes.windows {
        let key = window_key(pipeline, stage, window);
        match acc {
            Some(acc) => {
                windows.insert(key, (layout, acc.as_slice()))?;
            }
            None => {
                windows.remove(key)?;
            }
        }
    }
    Ok(())
}

/// A stage's previous version finished its windows (or never was): its record and any window
/// of its layout go.
fn end_draining(
    windows: &mut Windows<'_>,
    stages: &mut Stages<'_>,
    pipeline: &str,
    stage: &str,
) -> Result<(), redb::Error> {
    let Some(meta) = stages.remove(pipeline, stage, 1)? else {
        return Ok(());
    };
    let layout = meta.layout.unwrap_or_default();
    let start: WindowKey<'_> = (pipeline, stage, i64::MIN, i64::MIN, None);
    let mut stale: Vec<(i64, i64, Option<Vec<u8>>)> = Vec::new();
    for row in windows.range(start..)? {
        let (key, value) = row?;
        let (p, s, end_ms, start_ms, k) = key.value();
        if p != pipeline || s != stage {
            break;
        }
        if value.value().0 == layout {
            stale.push((end_ms, start_ms, k.map(<[u8]>::to_vec)));
        }
    }
    for (end_ms, start_ms, k) in stale {
        windows.remove((pipeline, stage, end_ms, start_ms, k.as_deref()))?;
    }
    Ok(())
}

/// Everything of `pipeline` goes.
fn delete_pipeline(
    windows: &mut Windows<'_>,
    stages: &mut Stages<'_>,
    positions: &mut redb::Table<'_, (&'static str, &'static str), u64>,
    pipeline: &str,
) -> Result<(), redb::Error> {
    let start: WindowKey<'_> = (pipeline, "", i64::MIN, i64::MIN, None);
    let mut keys: Vec<(String, i64, i64, Option<Vec<u8>>)> = Vec::new();
    for row in windows.range(start..)? {
        let (key, _) = row?;
        let (p, s, end_ms, start_ms, k) = key.value();
        if p != pipeline {
            break;
        }
        keys.push((s.to_owned(), end_ms, start_ms, k.map(<[u8]>::to_vec)));
    }
    for (s, end_ms, start_ms, k) in keys {
        windows.remove((pipeline, s.as_str(), end_ms, start_ms, k.as_deref()))?;
    }
    let mut metas: Vec<(String, u8)> = Vec::new();
    for row in stages.metas.range((pipeline, "", 0u8)..)? {
        let (key, _) = row?;
        let (p, s, role) = key.value();
        if p != pipeline {
            break;
        }
        metas.push((s.to_owned(), role));
    }
    for (s, role) in metas {
        stages.remove(pipeline, &s, role)?;
    }
    let mut sources: Vec<String> = Vec::new();
    for row in positions.range((pipeline, "")..)? {
        let (key, _) = row?;
        let (p, source) = key.value();
        if p != pipeline {
            break;
        }
        sources.push(source.to_owned());
    }
    for source in sources {
        positions.remove((pipeline, source.as_str()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
