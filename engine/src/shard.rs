//! The sharded bus: submissions are split by `hash(device_id) % shards` and handed to one
//! thread per shard through bounded crossbeam channels. A shard thread commits what it
//! received as a group (one WAL fsync for many submissions), acknowledges, and then shows
//! the batches to the observers (rules).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use arrow::array::{Array, RecordBatch, StringArray, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use parking_lot::{Mutex, RwLock};

use crate::ack::{Ack, AckPart};
use crate::batch::{DEVICE_COLUMN, StreamBatch, align_to_schema};
use crate::checkpoint::{Checkpoint, Committed, Recovery, RecoveryReport, Replayed};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Where committed batches go: storage implements it (WAL append + fsync, then the hot
/// buffer). Called only from the shard's own thread, so per-shard state needs no lock
/// against other shards.
pub trait ShardStore: Send + Sync {
    /// Makes `group` durable and queryable; returns only once it is on stable storage.
    fn commit(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String>;

    /// Like [`Self::commit`], for observers' outputs: marked as derived in the WAL, so that
    /// recovery can tell them from what clients sent.
    fn commit_derived(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
        self.commit(shard, group)
    }

    /// Closes the shard's current WAL segment and returns the sequence number of its last
    /// entry: the shard's cut. Called on the shard's own thread during a cut.
    fn rotate(&self, _shard: usize) -> std::result::Result<u64, String> {
        Err("this store takes no cuts".to_owned())
    }
}

/// Takes checkpoints: the engine, for storage's persister (which holds it weakly).
pub trait Cutter: Send + Sync {
    /// Pauses every shard between groups, cuts their WALs and encodes the observers' state.
    fn cut(&self) -> std::result::Result<Checkpoint, String>;
}

/// Sees every committed batch, on the thread of the shard that owns its devices (rules).
pub trait BatchObserver: Send + Sync {
    /// Called after `batches` were committed on `shard`. Returns derived batches (rule
    /// outputs), which the shard commits and shows to the observers in turn.
    fn observe(&self, shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch>;

    /// Called on each shard's thread about every [`EngineConfig::tick_interval`], also when
    /// no data arrives, so that time-driven state (silent devices, absences) moves on.
    /// Returns derived batches like [`Self::observe`].
    fn tick(&self, _shard: usize) -> Vec<StreamBatch> {
        Vec::new()
    }

    /// The name under which checkpoints keep this observer's state; `None` (the default):
    /// it keeps none worth saving.
    fn checkpoint_name(&self) -> Option<&'static str> {
        None
    }

    /// Encodes its state on `shard` (`None`: the state shared by all shards). Called during
    /// a cut, with every shard paused between groups.
    fn snapshot(&self, _shard: Option<usize>) -> std::result::Result<Vec<u8>, String> {
        Ok(Vec::new())
    }

    /// Restores state [`Self::snapshot`] encoded, before recovery replays what followed it.
    fn restore(&self, _shard: Option<usize>, _state: &[u8]) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Set while recovery shows the observers entries they saw before a crash: side effects
    /// that left the process then (webhooks, commands, publishes) are not repeated.
    fn set_replaying(&self, _on: bool) {}
}

/// How many rounds of derived batches a shard commits for one group: a rule reading the
/// output of a rule reading the output of ... ends here (the planner refuses direct loops).
const MAX_DERIVED_DEPTH: usize = 8;

/// The boundary between ingest and the engine: in one process a set of channels, in a
/// cluster a Kafka topic partitioned by device id.
pub trait BatchSink: Send + Sync {
    /// Submits decoded batches; blocks while the engine is saturated (back-pressure).
    /// `ack` completes once every row is durable.
    fn submit(&self, batches: Vec<StreamBatch>, ack: Ack) -> Result<()>;
}

/// Settings of the engine's shards.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of shard threads (default: one per core).
    pub shards: usize,
    /// Submissions each shard's channel holds; when full, submitters block.
    pub queue_depth: usize,
    /// Most rows a shard commits in one group (one WAL fsync): a group is sealed when it
    /// reaches this many rows...
    pub max_group_rows: usize,
    /// ...or when the shard's queue is empty and this much time has passed since the
    /// group's first submission (zero: commit as soon as nothing more is queued, so an idle
    /// system acknowledges after one fsync).
    pub group_linger: std::time::Duration,
    /// How often idle shards call [`BatchObserver::tick`].
    pub tick_interval: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            queue_depth: 1024,
            max_group_rows: 256 * 1024,
            group_linger: std::time::Duration::ZERO,
            tick_interval: std::time::Duration::from_millis(100),
        }
    }
}

enum ShardMsg {
    Batch(StreamBatch, AckPart),
    Barrier(Sender<()>),
    Cut(Arc<CutRound>),
    Recover(Box<RecoverJob>),
}

/// How long a cut waits for every shard to pause before it gives up (the persist then goes
/// on without a checkpoint).
const CUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One cut in progress: shards arrive, wait for each other, record their part, and wait
/// again until all are done (so that none mutates shared state while shard 0 encodes it).
struct CutRound {
    shards: usize,
    deadline: Instant,
    state: Mutex<CutState>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct CutState {
    arrived: usize,
    finished: usize,
    aborted: bool,
    error: Option<String>,
    checkpoint: Checkpoint,
}

impl CutRound {
    /// Waits until `done(state)` or the deadline; false when the round was aborted.
    fn wait(&self, state: &mut parking_lot::MutexGuard<'_, CutState>, done: impl Fn(&CutState) -> bool) -> bool {
        while !done(state) && !state.aborted {
            if self.changed.wait_until(state, self.deadline).timed_out() {
                state.aborted = true;
                self.changed.notify_all();
            }
        }
        !state.aborted
    }
}

/// Recovery's work for one shard: restore its observers' state, then show them the inputs
/// after the cut and commit the outputs the crash lost.
struct RecoverJob {
    states: Vec<(usize, Vec<u8>)>,
    entries: Vec<Replayed>,
    done: Sender<std::result::Result<RecoveryReport, String>>,
}

/// The running engine: shard threads and the channels into them.
pub struct Engine {
    senders: RwLock<Option<Vec<Sender<ShardMsg>>>>,
    /// Cleared to stop observers' ticks (before the last checkpoint of a shutdown).
    ticking: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    observers: Arc<RwLock<Vec<Arc<dyn BatchObserver>>>>,
    closed: AtomicBool,
    shards: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.shards).finish()
    }
}

/// Stable hash of a device id (FNV-1a 64): the same device maps to the same shard in every
/// process and across restarts.
pub fn device_hash(id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Engine {
    /// Starts the shard threads, committing through `store`.
    pub fn start(config: EngineConfig, store: Arc<dyn ShardStore>, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let shards = config.shards.max(1);
        let observers: Arc<RwLock<Vec<Arc<dyn BatchObserver>>>> = Arc::default();
        let ticking = Arc::new(AtomicBool::new(true));
        let mut senders = Vec::with_capacity(shards);
        let mut threads = Vec::with_capacity(shards);
        for shard in 0..shards {
            // Bounded: when a shard falls behind, `submit` blocks the decoder thread, which
            // holds back HTTP responses and MQTT reads (TCP push-back), never memory.
            let (tx, rx) = bounded(config.queue_depth.max(1));
            senders.push(tx);
            let worker = ShardWorker {
                shard,
                rx,
                store: store.clone(),
                observers: observers.clone(),
                ticking: ticking.clone(),
                metrics: metrics.clone(),
                max_group_rows: config.max_group_rows.max(1),
                group_linger: config.group_linger,
                tick_interval: config.tick_interval.max(std::time::Duration::from_millis(1)),
            };
            let handle = std::thread::Builder::new()
                .name(format!("ferrite-shard-{shard}"))
                .spawn(move || worker.run())
                .map_err(|e| Error::Commit(format!("cannot start shard thread: {e}")))?;
            threads.push(handle);
        }
        Ok(Arc::new(Self {
            senders: RwLock::new(Some(senders)),
            ticking,
            threads: Mutex::new(threads),
            observers,
            closed: AtomicBool::new(false),
            shards,
        }))
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The shard that owns `device_id`.
    pub fn shard_of(&self, device_id: &str) -> usize {
        (device_hash(device_id.as_bytes()) % self.shards as u64) as usize
    }

    /// Stops the observers' ticks (clock-driven work): after it, the observers' state moves
    /// only with committed batches. For the last checkpoint before a shutdown.
    pub fn stop_ticks(&self) {
        self.ticking.store(false, Ordering::SeqCst);
        // A tick already running finishes before the barrier passes.
        let _ = self.flush();
    }

    /// Registers an observer of committed batches (rules).
    pub fn add_observer(&self, observer: Arc<dyn BatchObserver>) {
        self.observers.write().push(observer);
    }

    /// Waits until everything submitted before this call is committed.
    pub fn flush(&self) -> Result<()> {
        let guard = self.senders.read();
        let Some(senders) = guard.as_ref() else { return Ok(()) };
        let mut waits = Vec::with_capacity(senders.len());
        for tx in senders {
            let (done_tx, done_rx) = bounded(1);
            tx.send(ShardMsg::Barrier(done_tx)).map_err(|_| Error::ShuttingDown)?;
            waits.push(done_rx);
        }
        drop(guard);
        for rx in waits {
            rx.recv().map_err(|_| Error::ShuttingDown)?;
        }
        Ok(())
    }

    /// Restores the observers' state from `recovery`'s checkpoint and runs them again over
    /// the input entries after its cut, committing the derived rows the crash lost. Call it
    /// after the rules are deployed and before ingest opens.
    pub fn recover(&self, recovery: Recovery) -> Result<RecoveryReport> {
        let observers = self.observers.read().clone();
        let Recovery { checkpoint, entries } = recovery;
        if checkpoint.cuts.len() != self.shards {
            return Err(Error::Commit(format!(
                "the checkpoint is of {} shards and this engine has {}",
                checkpoint.cuts.len(),
                self.shards
            )));
        }
        for (i, o) in observers.iter().enumerate() {
            let Some(state) = o.checkpoint_name().and_then(|n| checkpoint.states.get(n)) else { continue };
            o.restore(None, &state.shared)
                .map_err(|e| Error::Commit(format!("cannot restore shared state: {e} (observer {i})")))?;
        }
        for o in &observers {
            o.set_replaying(true);
        }
        let result = self.recover_shards(&observers, &checkpoint, entries);
        for o in &observers {
            o.set_replaying(false);
        }
        result
    }

    fn recover_shards(
        &self,
        observers: &[Arc<dyn BatchObserver>],
        checkpoint: &Checkpoint,
        mut entries: Vec<Vec<Replayed>>,
    ) -> Result<RecoveryReport> {
        let mut waits = Vec::with_capacity(self.shards);
        {
            let guard = self.senders.read();
            let Some(senders) = guard.as_ref() else { return Err(Error::ShuttingDown) };
            for (shard, tx) in senders.iter().enumerate() {
                let states = observers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, o)| {
                        let state = checkpoint.states.get(o.checkpoint_name()?)?;
                        Some((i, state.shards.get(shard).cloned().unwrap_or_default()))
                    })
                    .collect();
                let entries = entries.get_mut(shard).map(std::mem::take).unwrap_or_default();
                let (done, rx) = bounded(1);
                tx.send(ShardMsg::Recover(Box::new(RecoverJob { states, entries, done })))
                    .map_err(|_| Error::ShuttingDown)?;
                waits.push(rx);
            }
        }
        let mut report = RecoveryReport::default();
        for rx in waits {
            let r = rx.recv().map_err(|_| Error::ShuttingDown)?.map_err(Error::Commit)?;
            report.input_rows += r.input_rows;
            report.found_rows += r.found_rows;
            report.committed_rows += r.committed_rows;
        }
        Ok(report)
    }

    /// Stops accepting submissions, lets the shards drain what they hold, and joins them.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.senders.write().take();
        for handle in self.threads.lock().drain(..) {
            if handle.join().is_err() {
                tracing::error!("a shard thread panicked");
            }
        }
    }

    fn split(&self, sb: StreamBatch) -> Result<Vec<(usize, StreamBatch)>> {
        split_by_device(sb, self.shards)
    }
}

/// Splits a batch into the rows of each of `shards` shards (by [`device_hash`]), as the
/// engine routes them; a batch whose rows all belong to one shard is passed through whole.
pub fn split_by_device(sb: StreamBatch, shards: usize) -> Result<Vec<(usize, StreamBatch)>> {
    if shards <= 1 {
        return Ok(vec![(0, sb)]);
    }
    let col = sb.batch.column_by_name(DEVICE_COLUMN).and_then(|c| c.as_any().downcast_ref::<StringArray>());
    let Some(devices) = col else {
        return Err(Error::Commit(format!("stream `{}`: batch without a string device_id column", sb.stream)));
    };
    let n = shards as u64;
    let shard_of = |i: usize| (device_hash(devices.value(i).as_bytes()) % n) as u32;
    let rows = devices.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    let first = shard_of(0);
    let mut ids = Vec::with_capacity(rows);
    let mut uniform = true;
    for i in 0..rows {
        let s = shard_of(i);
        uniform &= s == first;
        ids.push(s);
    }
    if uniform {
        return Ok(vec![(first as usize, sb)]);
    }
    let mut out = Vec::with_capacity(shards);
    for shard in 0..shards as u32 {
        let idx: UInt32Array = ids.iter().enumerate().filter(|(_, s)| **s == shard).map(|(i, _)| i as u32).collect();
        if idx.is_empty() {
            continue;
        }
        let part = take_record_batch(&sb.batch, &idx)?;
        out.push((shard as usize, StreamBatch::new(sb.stream.clone(), part)));
    }
    Ok(out)
}

impl Cutter for Engine {
    fn cut(&self) -> std::result::Result<Checkpoint, String> {
        let round = Arc::new(CutRound {
            shards: self.shards,
            deadline: Instant::now() + CUT_TIMEOUT,
            state: Mutex::new(CutState {
                checkpoint: Checkpoint { cuts: vec![0; self.shards], states: Default::default() },
                ..CutState::default()
            }),
            changed: parking_lot::Condvar::new(),
        });
        {
            let guard = self.senders.read();
            let Some(senders) = guard.as_ref() else { return Err("the engine is shut down".to_owned()) };
            for tx in senders {
                let left = round.deadline.saturating_duration_since(Instant::now());
                if tx.send_timeout(ShardMsg::Cut(round.clone()), left).is_err() {
                    let mut st = round.state.lock();
                    st.aborted = true;
                    round.changed.notify_all();
                    return Err("a shard did not take the cut in time".to_owned());
                }
            }
        }
        let mut st = round.state.lock();
        if !round.wait(&mut st, |s| s.finished == round.shards) {
            return Err(st.error.clone().unwrap_or_else(|| format!("the shards did not pause within {CUT_TIMEOUT:?}")));
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        Ok(std::mem::take(&mut st.checkpoint))
    }
}

impl BatchSink for Engine {
    fn submit(&self, batches: Vec<StreamBatch>, ack: Ack) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let mut parts = Vec::new();
        for sb in batches {
            parts.extend(self.split(sb)?);
        }
        let guard = self.senders.read();
        let Some(senders) = guard.as_ref() else { return Err(Error::ShuttingDown) };
        for (shard, part) in parts {
            senders[shard].send(ShardMsg::Batch(part, ack.part())).map_err(|_| Error::ShuttingDown)?;
        }
        Ok(())
    }
}

struct ShardWorker {
    shard: usize,
    rx: Receiver<ShardMsg>,
    store: Arc<dyn ShardStore>,
    observers: Arc<RwLock<Vec<Arc<dyn BatchObserver>>>>,
    ticking: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    max_group_rows: usize,
    group_linger: std::time::Duration,
    tick_interval: std::time::Duration,
}

impl ShardWorker {
    fn run(self) {
        let mut pending: Vec<(StreamBatch, AckPart)> = Vec::new();
        let mut barriers: Vec<Sender<()>> = Vec::new();
        let mut cuts: Vec<Arc<CutRound>> = Vec::new();
        let mut recoveries: Vec<Box<RecoverJob>> = Vec::new();
        let mut next_tick = Instant::now() + self.tick_interval;
        loop {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + self.tick_interval;
                if self.ticking.load(Ordering::Relaxed) {
                    let observers = self.observers.read().clone();
                    let derived = self.run_observers(&observers, |o| o.tick(self.shard));
                    self.commit_derived(derived, &observers);
                }
            }
            let first = match self.rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(msg) => msg,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let mut rows = 0;
            let mut push = |msg: ShardMsg, pending: &mut Vec<(StreamBatch, AckPart)>, rows: &mut usize| match msg {
                ShardMsg::Batch(b, a) => {
                    *rows += b.num_rows();
                    pending.push((b, a));
                }
                ShardMsg::Barrier(tx) => barriers.push(tx),
                ShardMsg::Cut(round) => cuts.push(round),
                ShardMsg::Recover(job) => recoveries.push(job),
            };
            push(first, &mut pending, &mut rows);
            let sealed_at = Instant::now() + self.group_linger;
            // Group commit: take whatever else is queued (or arrives within the linger),
            // up to the row bound.
            while rows < self.max_group_rows {
                match self.rx.try_recv() {
                    Ok(msg) => push(msg, &mut pending, &mut rows),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let left = sealed_at.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match self.rx.recv_timeout(left) {
                            Ok(msg) => push(msg, &mut pending, &mut rows),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.commit_group(&mut pending);
            for job in recoveries.drain(..) {
                let RecoverJob { states, entries, done } = *job;
                let _ = done.send(self.recover(states, entries));
            }
            for round in cuts.drain(..) {
                self.take_cut(&round);
            }
            for b in barriers.drain(..) {
                let _ = b.send(());
            }
        }
        tracing::debug!(shard = self.shard, "shard stopped");
    }

    fn commit_group(&self, pending: &mut Vec<(StreamBatch, AckPart)>) {
        if pending.is_empty() {
            return;
        }
        let (batches, acks): (Vec<StreamBatch>, Vec<AckPart>) = pending.drain(..).unzip();
        let group = match coalesce(batches) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(shard = self.shard, error = %e, "cannot coalesce a group");
                for a in acks {
                    a.fail(e.to_string());
                }
                return;
            }
        };
        let started = Instant::now();
        match self.store.commit(self.shard, &group) {
            Ok(()) => {
                self.metrics.histogram("ferrite_wal_commit_seconds", &[]).observe(started.elapsed());
                self.metrics.inc("ferrite_batches_total", &[], group.len() as u64);
                for a in acks {
                    a.commit();
                }
                let observers = self.observers.read().clone();
                let derived = self.run_observers(&observers, |o| o.observe(self.shard, &group));
                self.commit_derived(derived, &observers);
            }
            Err(e) => {
                tracing::error!(shard = self.shard, error = %e, "commit failed");
                for a in acks {
                    a.fail(e.clone());
                }
            }
        }
    }
}

impl ShardWorker {
    /// Calls every observer; a panicking observer is caught and counted, so that the shard
    /// thread (and every device it owns) survives a bug in it.
    fn run_observers(
        &self,
        observers: &[Arc<dyn BatchObserver>],
        call: impl Fn(&dyn BatchObserver) -> Vec<StreamBatch>,
    ) -> Vec<StreamBatch> {
        let mut out = Vec::new();
        for o in observers {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(o.as_ref()))) {
                Ok(derived) => out.extend(derived),
                Err(_) => {
                    self.metrics.inc("ferrite_observer_panics_total", &[], 1);
                    tracing::error!(shard = self.shard, "an observer of committed batches panicked; the shard goes on");
                }
            }
        }
        out
    }

    /// Commits rule outputs on this shard (WAL and hot buffer, like ingested data) and
    /// shows them to the observers, so derived streams are first-class streams.
    fn commit_derived(&self, mut derived: Vec<StreamBatch>, observers: &[Arc<dyn BatchObserver>]) {
        for depth in 0.. {
            derived.retain(|b| b.num_rows() > 0);
            if derived.is_empty() {
                return;
            }
            if depth == MAX_DERIVED_DEPTH {
                tracing::error!(
                    shard = self.shard,
                    "rules derive from derived streams more than {MAX_DERIVED_DEPTH} levels deep; dropping the deepest outputs"
                );
                return;
            }
            let group = match coalesce(std::mem::take(&mut derived)) {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(shard = self.shard, error = %e, "cannot coalesce derived batches");
                    return;
                }
            };
            if let Err(e) = self.store.commit_derived(self.shard, &group) {
                tracing::error!(shard = self.shard, error = %e, "cannot commit derived batches");
                return;
            }
            self.metrics.inc("ferrite_batches_total", &[], group.len() as u64);
            derived = self.run_observers(observers, |o| o.observe(self.shard, &group));
        }
    }
}

/// One observer's part of a cut on one shard: its name, the shared state (shard 0 only) and
/// the shard's own state.
type ObserverPart = (&'static str, Option<Vec<u8>>, Vec<u8>);

impl ShardWorker {
    /// This shard's part of a cut: wait until every shard has paused, cut the WAL and encode
    /// the observers' state (shard 0 also the shared state), then wait until all are done.
    fn take_cut(&self, round: &CutRound) {
        let mut st = round.state.lock();
        if st.aborted {
            return;
        }
        st.arrived += 1;
        round.changed.notify_all();
        if !round.wait(&mut st, |s| s.arrived == round.shards) {
            return;
        }
        drop(st);
        let part = self.cut_part();
        let mut st = round.state.lock();
        match part {
            Ok((cut, states)) => {
                st.checkpoint.cuts[self.shard] = cut;
                for (name, shared, own) in states {
                    let entry = st.checkpoint.states.entry(name.to_owned()).or_default();
                    if entry.shards.len() < round.shards {
                        entry.shards.resize(round.shards, Vec::new());
                    }
                    entry.shards[self.shard] = own;
                    if let Some(shared) = shared {
                        entry.shared = shared;
                    }
                }
            }
            Err(e) => {
                tracing::error!(shard = self.shard, error = %e, "cannot take this shard's part of a checkpoint");
                st.error = Some(e);
            }
        }
        st.finished += 1;
        round.changed.notify_all();
        round.wait(&mut st, |s| s.finished == round.shards);
    }

    /// The WAL cut and the observers' state of this shard (shard 0: also the shared state),
    /// taken while every shard is paused.
    fn cut_part(&self) -> std::result::Result<(u64, Vec<ObserverPart>), String> {
        let cut = self.store.rotate(self.shard)?;
        let mut states = Vec::new();
        for o in self.observers.read().iter() {
            let Some(name) = o.checkpoint_name() else { continue };
            let shared = if self.shard == 0 { Some(o.snapshot(None)?) } else { None };
            states.push((name, shared, o.snapshot(Some(self.shard))?));
        }
        Ok((cut, states))
    }

    /// Recovery on this shard: restores the observers' state, shows them the input entries
    /// after the cut, and commits only the derived rows the WAL does not hold already.
    fn recover(
        &self,
        states: Vec<(usize, Vec<u8>)>,
        entries: Vec<Replayed>,
    ) -> std::result::Result<RecoveryReport, String> {
        let observers = self.observers.read().clone();
        for (i, state) in states {
            if let Some(o) = observers.get(i) {
                o.restore(Some(self.shard), &state)?;
            }
        }
        let mut report = RecoveryReport::default();
        let (derived, inputs): (Vec<Replayed>, Vec<Replayed>) = entries.into_iter().partition(|e| e.derived);
        let mut committed = Committed::new(derived.into_iter().map(|e| e.batch));
        let inputs: Vec<StreamBatch> = inputs.into_iter().map(|e| e.batch).collect();
        report.input_rows = inputs.iter().map(StreamBatch::num_rows).sum();
        if inputs.is_empty() {
            return Ok(report);
        }
        let mut derived = self.run_observers(&observers, |o| o.observe(self.shard, &inputs));
        for _ in 0..MAX_DERIVED_DEPTH {
            derived.retain(|b| b.num_rows() > 0);
            if derived.is_empty() {
                break;
            }
            let group = coalesce(std::mem::take(&mut derived)).map_err(|e| e.to_string())?;
            let (lost, found) = committed.subtract(group.clone()).map_err(|e| e.to_string())?;
            report.found_rows += found;
            if !lost.is_empty() {
                let lost = coalesce(lost).map_err(|e| e.to_string())?;
                self.store.commit_derived(self.shard, &lost)?;
                report.committed_rows += lost.iter().map(StreamBatch::num_rows).sum::<usize>();
            }
            derived = self.run_observers(&observers, |o| o.observe(self.shard, &group));
        }
        Ok(report)
    }
}

/// Concatenates the batches of each stream into one (schemas only grow, so the widest
/// schema of a stream covers all of its batches).
fn coalesce(batches: Vec<StreamBatch>) -> Result<Vec<StreamBatch>> {
    let mut by_stream: Vec<(StreamBatch, Vec<RecordBatch>)> = Vec::new();
    for sb in batches {
        match by_stream.iter_mut().find(|(s, _)| s.stream == sb.stream) {
            Some((_, rest)) => rest.push(sb.batch),
            None => by_stream.push((sb, Vec::new())),
        }
    }
    by_stream
        .into_iter()
        .map(|(first, rest)| {
            if rest.is_empty() {
                return Ok(first);
            }
            let schema = std::iter::once(&first.batch)
                .chain(rest.iter())
                .map(|b| b.schema())
                .max_by_key(|s| s.fields().len())
                .unwrap_or_else(|| first.batch.schema());
            let aligned = std::iter::once(&first.batch)
                .chain(rest.iter())
                .map(|b| align_to_schema(b, &schema))
                .collect::<Result<Vec<_>>>()?;
            let batch = concat_batches(&schema, &aligned)?;
            Ok(StreamBatch::new(first.stream, batch))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{TIME_COLUMN, time_field_type};
    use crate::ids::StreamName;
    use arrow::array::TimestampNanosecondArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::collections::HashMap;

    #[derive(Default)]
    struct Recorder {
        rows: Mutex<Vec<(usize, Vec<String>)>>,
    }

    impl ShardStore for Recorder {
        fn commit(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
            for sb in group {
                let d = sb.batch.column(1).as_any().downcast_ref::<StringArray>().ok_or("no devices")?;
                self.rows.lock().push((shard, d.iter().flatten().map(str::to_owned).collect()));
            }
            Ok(())
        }
    }

    fn batch(devices: &[&str]) -> Result<StreamBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new(TIME_COLUMN, time_field_type(), false),
            Field::new(DEVICE_COLUMN, DataType::Utf8, false),
        ]));
        let t = TimestampNanosecondArray::from(vec![0; devices.len()]).with_timezone("UTC");
        let b = RecordBatch::try_new(schema, vec![Arc::new(t), Arc::new(StringArray::from(devices.to_vec()))])?;
        Ok(StreamBatch::new(StreamName::new("t")?, b))
    }

    #[test]
    fn a_lingering_group_is_sealed_by_its_row_bound() -> Result<()> {
        let store = Arc::new(Recorder::default());
        // A linger far longer than the test may take: only the row bound can seal the group.
        let config = EngineConfig {
            shards: 1,
            max_group_rows: 3,
            group_linger: std::time::Duration::from_secs(3600),
            ..EngineConfig::default()
        };
        let engine = Engine::start(config, store.clone(), Arc::new(Metrics::new()))?;
        let mut waiters = Vec::new();
        for d in ["a", "b", "c"] {
            let (ack, rx) = Ack::new();
            engine.submit(vec![batch(&[d])?], ack)?;
            waiters.push(rx);
        }
        for rx in waiters {
            assert_eq!(rx.blocking_recv().map_err(|_| Error::ShuttingDown)?, Ok(()));
        }
        // One group, coalesced into one batch of the stream.
        assert_eq!(store.rows.lock().clone(), vec![(0, vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])]);
        Ok(())
    }

    /// A store keeping every entry with its shard, sequence number and kind.
    #[derive(Default)]
    struct Log {
        entries: Mutex<Vec<(usize, u64, bool, StreamBatch)>>,
        next: Mutex<HashMap<usize, u64>>,
    }

    impl Log {
        fn append(&self, shard: usize, group: &[StreamBatch], derived: bool) {
            let mut next = self.next.lock();
            let seq = next.entry(shard).or_insert(1);
            for sb in group {
                self.entries.lock().push((shard, *seq, derived, sb.clone()));
                *seq += 1;
            }
        }
    }

    impl ShardStore for Log {
        fn commit(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
            self.append(shard, group, false);
            Ok(())
        }

        fn commit_derived(&self, shard: usize, group: &[StreamBatch]) -> std::result::Result<(), String> {
            self.append(shard, group, true);
            Ok(())
        }

        fn rotate(&self, shard: usize) -> std::result::Result<u64, String> {
            Ok(self.next.lock().get(&shard).copied().unwrap_or(1) - 1)
        }
    }

    /// Counts events per device; derives, for each input batch of stream `t`, one row per
    /// device with its running count (as the device id `{device}#{count}`) into `counts`.
    #[derive(Default)]
    struct Counter {
        counts: Mutex<HashMap<String, u64>>,
        replaying: AtomicBool,
        replayed: Mutex<u64>,
    }

    impl BatchObserver for Counter {
        fn observe(&self, _shard: usize, batches: &[StreamBatch]) -> Vec<StreamBatch> {
            let mut out = Vec::new();
            for sb in batches.iter().filter(|b| b.stream.as_str() == "t") {
                if self.replaying.load(Ordering::SeqCst) {
                    *self.replayed.lock() += sb.num_rows() as u64;
                }
                let Some(d) = sb.batch.column(1).as_any().downcast_ref::<StringArray>() else { continue };
                let mut counts = self.counts.lock();
                let mut derived = Vec::new();
                for dev in d.iter().flatten() {
                    let n = counts.entry(dev.to_owned()).or_default();
                    *n += 1;
                    derived.push(format!("{dev}#{n}"));
                }
                let refs: Vec<&str> = derived.iter().map(String::as_str).collect();
                if let (Ok(b), Ok(name)) = (batch(&refs), StreamName::new("counts")) {
                    out.push(StreamBatch::new(name, b.batch));
                }
            }
            out
        }

        fn checkpoint_name(&self) -> Option<&'static str> {
            Some("counter")
        }

        fn snapshot(&self, shard: Option<usize>) -> std::result::Result<Vec<u8>, String> {
            // All state in the shared part, for simplicity; shards hand over nothing.
            if shard.is_some() {
                return Ok(Vec::new());
            }
            serde_json::to_vec(&*self.counts.lock()).map_err(|e| e.to_string())
        }

        fn restore(&self, shard: Option<usize>, state: &[u8]) -> std::result::Result<(), String> {
            if shard.is_none() {
                *self.counts.lock() = serde_json::from_slice(state).map_err(|e| e.to_string())?;
            }
            Ok(())
        }

        fn set_replaying(&self, on: bool) {
            self.replaying.store(on, Ordering::SeqCst);
        }
    }

    fn submit(engine: &Engine, devices: &[&str]) -> Result<()> {
        let (ack, rx) = Ack::new();
        engine.submit(vec![batch(devices)?], ack)?;
        assert_eq!(rx.blocking_recv().map_err(|_| Error::ShuttingDown)?, Ok(()));
        Ok(())
    }

    fn devices_of(sb: &StreamBatch) -> Vec<String> {
        sb.batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .map(|d| d.iter().flatten().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    #[test]
    fn recovery_continues_from_a_cut_and_commits_only_the_outputs_a_crash_lost() -> Result<()> {
        let config = EngineConfig { shards: 2, ..EngineConfig::default() };
        let log = Arc::new(Log::default());
        let engine = Engine::start(config.clone(), log.clone(), Arc::new(Metrics::new()))?;
        let counter = Arc::new(Counter::default());
        engine.add_observer(counter.clone());
        submit(&engine, &["a", "b", "c"])?;
        submit(&engine, &["a", "b"])?;
        engine.flush()?;
        let checkpoint = engine.cut().map_err(Error::Commit)?;
        assert_eq!(checkpoint.states["counter"].shards.len(), 2);
        submit(&engine, &["a", "c", "d"])?;
        submit(&engine, &["a"])?;
        engine.flush()?;
        let reference = counter.counts.lock().clone();
        engine.shutdown();

        // The WAL after the cut, as a crash leaves it: the last derived entry of each shard
        // never made it to disk.
        let entries = log.entries.lock().clone();
        let mut after: Vec<Vec<Replayed>> = vec![Vec::new(); 2];
        let mut lost = Vec::new();
        for (shard, list) in after.iter_mut().enumerate() {
            let mine: Vec<_> =
                entries.iter().filter(|e| e.0 == shard && e.1 > checkpoint.cuts[shard]).cloned().collect();
            let last_derived = mine.iter().rposition(|e| e.2);
            for (i, (_, _, derived, sb)) in mine.into_iter().enumerate() {
                if Some(i) == last_derived {
                    lost.extend(devices_of(&sb));
                } else {
                    list.push(Replayed { derived, batch: sb });
                }
            }
        }
        assert!(!lost.is_empty(), "the test must lose something");

        let log2 = Arc::new(Log::default());
        let engine2 = Engine::start(config, log2.clone(), Arc::new(Metrics::new()))?;
        let counter2 = Arc::new(Counter::default());
        engine2.add_observer(counter2.clone());
        let report = engine2.recover(Recovery { checkpoint, entries: after })?;
        assert_eq!(*counter2.counts.lock(), reference, "the state continues as if nothing happened");
        assert_eq!(*counter2.replayed.lock(), 4, "the inputs after the cut were seen again, replaying");
        assert!(!counter2.replaying.load(Ordering::SeqCst));
        let mut committed: Vec<String> =
            log2.entries.lock().iter().filter(|e| e.2).flat_map(|e| devices_of(&e.3)).collect();
        committed.sort();
        lost.sort();
        assert_eq!(committed, lost, "exactly the lost outputs are committed again");
        assert_eq!(report.committed_rows, lost.len());
        assert_eq!(report.found_rows + report.committed_rows, 4);
        engine2.shutdown();
        Ok(())
    }

    struct Panicking;

    impl BatchObserver for Panicking {
        fn observe(&self, _shard: usize, _batches: &[StreamBatch]) -> Vec<StreamBatch> {
            panic!("observer bug");
        }
    }

    #[test]
    fn a_panicking_observer_does_not_kill_the_shard() -> Result<()> {
        let store = Arc::new(Recorder::default());
        let metrics = Arc::new(Metrics::new());
        let engine =
            Engine::start(EngineConfig { shards: 1, ..EngineConfig::default() }, store.clone(), metrics.clone())?;
        engine.add_observer(Arc::new(Panicking));
        for d in ["a", "b"] {
            let (ack, rx) = Ack::new();
            engine.submit(vec![batch(&[d])?], ack)?;
            assert_eq!(rx.blocking_recv().map_err(|_| Error::ShuttingDown)?, Ok(()), "still committing after a panic");
        }
        engine.flush()?; // observers run after the acknowledgement; wait for them
        assert_eq!(metrics.counter_value("ferrite_observer_panics_total", &[]), 2);
        assert_eq!(store.rows.lock().len(), 2);
        Ok(())
    }

    #[test]
    fn rows_go_to_the_shard_of_their_device() -> Result<()> {
        let store = Arc::new(Recorder::default());
        let config = EngineConfig { shards: 3, ..EngineConfig::default() };
        let engine = Engine::start(config, store.clone(), Arc::new(Metrics::new()))?;
        let devices: Vec<String> = (0..50).map(|i| format!("dev-{i}")).collect();
        let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
        let (ack, rx) = Ack::new();
        engine.submit(vec![batch(&refs)?], ack)?;
        let outcome = rx.blocking_recv().map_err(|_| Error::ShuttingDown)?;
        assert_eq!(outcome, Ok(()));
        let seen = store.rows.lock().clone();
        let total: usize = seen.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(total, 50);
        for (shard, ds) in seen {
            for d in ds {
                assert_eq!(engine.shard_of(&d), shard, "device {d} on the wrong shard");
            }
        }
        engine.shutdown();
        assert!(matches!(engine.submit(vec![batch(&["x"])?], Ack::detached()), Err(Error::ShuttingDown)));
        Ok(())
    }
}
