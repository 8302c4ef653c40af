//! The wasmtime engine, the artifact cache, and loaded handlers.
//!
//! Owns [`Runtime`] (one engine with epoch interruption and the pooling allocator, the linker, the
//! epoch ticker, the workers) and [`WasmHandler`] (a pre-linked component and how its calls run: a
//! fresh instance per call, or a warm one per worker). One call's store is [`super::sandbox`]'s.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::bindings::{self, asynchronous};
use super::cache::Cache;
use super::outbound::Outbound;
use super::pool::{Job, Pool, Retirer};
use super::sandbox::{self, Host, Meta};
use crate::auth::Roles;
use crate::model::ReplyLimit;
use crate::model::message::{
    Admission, BatchDone, BatchHandler, BoxFuture, Handler, Message, Outcome, Sender, StateReader,
    StateSlot,
};
use crate::model::naming::Naming;

/// How often the epoch ticks; deadlines are rounded up to it.
pub const TICK: Duration = Duration::from_millis(5);

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    /// Where compiled artifacts are kept; None disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Threads running handler calls.
    pub workers: usize,
    /// The most stack a guest may use.
    pub max_stack: usize,
    /// The largest memory limit of any handler.
    pub max_memory: usize,
    /// Handlers configured with instance reuse (each keeps one warm instance per worker).
    pub reused: usize,
    /// Calls of asynchronous handlers (granted outbound HTTP) in flight at once, summed over them.
    pub concurrent: usize,
    /// What one message's handler may publish (`[limits]`).
    pub reply_limit: ReplyLimit,
}

/// One configured handler.
#[derive(Clone, Debug, PartialEq)]
pub struct WasmSpec {
    pub name: String,
    pub file: PathBuf,
    pub roles: Roles,
    pub memory: usize,
    pub timeout: Duration,
    /// Keep a warm instance per worker and retire it after this many messages; None = a fresh
    /// instance per message.
    pub reuse: Option<u64>,
    pub require_sender_token: bool,
    pub config: BTreeMap<String, String>,
    /// The namespace of its state keys (`state` in its entry), if it keeps state.
    pub state: Option<String>,
    /// What it may reach over HTTP, if anything; such a handler's calls run asynchronously.
    pub outbound: Option<Outbound>,
}

/// The engine, the linker and the workers; handlers are loaded from it.
pub struct Runtime {
    /// What the engine and pool were sized for.
    settings: RuntimeSettings,
    engine: Engine,
    linker: Linker<Host>,
    /// For handlers granted outbound HTTP: WASI and `wasi:http` with async host functions.
    async_linker: Linker<Host>,
    naming: Arc<Naming>,
    cache_dir: Option<PathBuf>,
    pool: Pool,
    ticker: Arc<Ticker>,
    /// Where handlers keeping state read it.
    state_reader: Arc<StateSlot>,
    /// Stub responses for outbound requests, when a local test sets them.
    responder: Arc<super::outbound::ResponderSlot>,
}

/// Stops the epoch ticker thread once the runtime and every handler loaded from it are gone: a handler
/// still finishing a message after a reload replaced its runtime keeps its deadline.
struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    pub fn new(s: &RuntimeSettings, naming: Arc<Naming>) -> Result<Runtime, String> {
        let workers = s.workers.max(1);
        // At most one fresh instance per worker is live at once, plus the warm ones of reused handlers —
        // twice over, for a reload: the replaced handlers' instances are retired once their last
        // message is done, while the new ones warm up beside them.
        // Asynchronous calls hold an instance each while they wait: their concurrency, twice over.
        let instances = (workers * (1 + 2 * s.reused) + 2 + 2 * s.concurrent) as u32;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 16)
            .max_memories_per_component(8)
            .total_memories(instances * 4)
            .max_tables_per_component(16)
            .total_tables(instances * 16)
            .total_stacks(instances)
            .max_memory_size(s.max_memory)
            // Reset in place rather than returned to the kernel: madvise costs page faults and TLB
            // shoot-downs on the next use. With PAGEMAP_SCAN (Linux 6.7 and later; elsewhere the
            // low addresses are memset blindly) only the pages a call dirtied are copied back from
            // the image, up to this budget: a Rust guest dirties about 100 KiB, a JavaScript or
            // Python interpreter several hundred, spread over its heap. Together they took a fresh
            // QuickJS instance from 330 to 200 µs (docs/performance.md). Tables are small; without
            // keeping them resident they were a third of a fresh instance's cost.
            .linear_memory_keep_resident(1024 * 1024)
            .pagemap_scan(wasmtime::Enabled::Auto)
            .table_keep_resident(64 * 1024)
            // A slot waiting in the decommit queue is not free: batches must stay well below the
            // number of memories, or instantiation fails with the pool exhausted.
            .decommit_batch_size(instances as usize);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(s.max_stack)
            // An asynchronous call runs on a fiber stack of its own: the wasm stack and room above.
            .async_stack_size(s.max_stack + HOST_STACK)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // A profiling aid: REDSTREAM_WASM_PERFMAP=1 writes /tmp/perf-<pid>.map, so that `perf
        // report` names the guests' functions (docs/performance.md, "Handlers in each language").
        if std::env::var_os("REDSTREAM_WASM_PERFMAP").is_some_and(|v| v == "1") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine =
            Engine::new(&config).map_err(|e| format!("cannot configure wasmtime: {e:#}"))?;
        let mut linker = Linker::<Host>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| format!("cannot link WASI: {e:#}"))?;
        // A component may import wasi:http without being granted any origin (componentize-js adds
        // it; an example calls out only when configured to): it links, and every request is refused.
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(|e| format!("cannot link wasi:http: {e:#}"))?;
        bindings::Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |h| h)
            .map_err(|e| format!("cannot link the host interface: {e:#}"))?;
        let mut async_linker = Linker::<Host>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut async_linker)
            .map_err(|e| format!("cannot link WASI: {e:#}"))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut async_linker)
            .map_err(|e| format!("cannot link wasi:http: {e:#}"))?;
        asynchronous::Handler::add_to_linker::<_, HasSelf<_>>(&mut async_linker, |h| h)
            .map_err(|e| format!("cannot link the host interface: {e:#}"))?;

        let stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, ticker_stop) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("redstream-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        // Guests run on the workers' native stacks: leave room above the wasm stack bound.
        let pool = Pool::new(workers, s.max_stack + HOST_STACK, retire_warm)
            .map_err(|e| format!("cannot start workers: {e}"))?;
        Ok(Runtime {
            settings: s.clone(),
            engine,
            linker,
            async_linker,
            naming,
            cache_dir: s.cache_dir.clone(),
            pool,
            ticker: Arc::new(Ticker(stop)),
            state_reader: Arc::new(StateSlot::new()),
            responder: Arc::new(super::outbound::ResponderSlot::new()),
        })
    }

    /// Where handlers loaded from this runtime (before or after) read their state; the first call
    /// decides.
    pub fn read_state_with(&self, reader: Arc<dyn StateReader>) {
        let _ = self.state_reader.set(reader);
    }

    /// Answers the outbound requests of handlers loaded from this runtime with `responder` instead of
    /// the network (a local `handler test`; the allow-list still applies). The first call decides.
    pub fn answer_http_with(&self, responder: Arc<dyn super::outbound::Responder>) {
        let _ = self.responder.set(responder);
    }

    /// Whether handlers configured with `s` fit this engine and pool: a reload keeps the runtime (and
    /// its compiled artifacts) when they do, and builds a new one when the pool or limits must change.
    pub fn serves(&self, s: &RuntimeSettings) -> bool {
        let have = &self.settings;
        s.workers == have.workers
            && s.max_stack == have.max_stack
            && s.max_memory <= have.max_memory
            && s.reused <= have.reused
            && s.concurrent <= have.concurrent
            && s.cache_dir == have.cache_dir
    }

    /// Compiles (or loads from the cache) and pre-links a handler. The error names the file and, for
    /// a missing import, the import.
    pub fn load(&self, spec: &WasmSpec) -> Result<WasmHandler, String> {
        self.load_reporting(spec, &|line| tracing::info!(handler = %spec.name, "{line}"))
    }

    /// [`Runtime::load`], telling `report` when the component is compiled (not found in the cache):
    /// seconds for a JavaScript or Python component, which must not pass in silence.
    pub fn load_reporting(
        &self,
        spec: &WasmSpec,
        report: &dyn Fn(&str),
    ) -> Result<WasmHandler, String> {
        let bytes = std::fs::read(&spec.file)
            .map_err(|e| format!("cannot read {}: {e}", spec.file.display()))?;
        if let Some(why) = not_a_component(&bytes) {
            return Err(format!("{}: {why}", spec.file.display()));
        }
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let component = self.compile(&bytes, &digest, &spec.file, report)?;
        let hint = |component: &Component| {
            diagnose(&self.engine, component)
                .map(|h| format!("; {h}"))
                .unwrap_or_default()
        };
        let linker = match spec.outbound {
            Some(_) => &self.async_linker,
            None => &self.linker,
        };
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "{} cannot be linked: {e:#} (handlers may import only redstream:handler, WASI, which is denied, and wasi:http, which reaches only the origins of allowed_outbound_hosts){}",
                spec.file.display(),
                hint(&component)
            )
        })?;
        let not_handler = |e: wasmtime::Error| {
            format!(
                "{} is not a RedStream handler (it must export `handle` of redstream:handler@{WIT_VERSION}): {e:#}{}",
                spec.file.display(),
                hint(&component)
            )
        };
        let pre = match &spec.outbound {
            None => Pre::Sync(bindings::HandlerPre::new(pre).map_err(not_handler)?),
            Some(o) => Pre::Async {
                pre: asynchronous::HandlerPre::new(pre).map_err(not_handler)?,
                permits: Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1))),
            },
        };
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(WasmHandler {
            inner: Arc::new(Inner {
                retire: self.pool.retire.clone(),
                _ticker: self.ticker.clone(),
                meta: Arc::new(Meta {
                    name: spec.name.clone(),
                    roles: spec.roles.clone(),
                    naming: self.naming.clone(),
                    config: spec.config.clone(),
                    memory: spec.memory,
                    timeout: spec.timeout,
                    replies: self.settings.reply_limit,
                    state: spec.state.clone().map(|ns| (ns, self.state_reader.clone())),
                    outbound: spec.outbound.clone().map(Arc::new),
                    responder: self.responder.clone(),
                }),
                pre,
                engine: self.engine.clone(),
                ticks: (spec.timeout.as_nanos() / TICK.as_nanos()) as u64 + 1,
                reuse: spec.reuse,
                id: IDS.fetch_add(1, Ordering::Relaxed),
            }),
            pool: self.pool.clone(),
            require_sender_token: spec.require_sender_token,
            digest,
        })
    }

    fn compile(
        &self,
        bytes: &[u8],
        source: &[u8; 32],
        file: &Path,
        report: &dyn Fn(&str),
    ) -> Result<Component, String> {
        let source = *source;
        let cached = self.cache_dir.as_ref().map(|dir| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            let cache = Cache::new(dir.clone());
            let path = cache.path(&source, h.finish());
            (cache, path)
        });
        if let Some((cache, path)) = &cached
            && let Some(component) = cache.load(&self.engine, path, &source)
        {
            return Ok(component);
        }
        let size = bytes.len() as f64 / f64::from(1 << 20);
        report(&format!("compiling {} ({size:.1} MiB) …", file.display()));
        let started = std::time::Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| {
            format!(
                "{} is not a valid WebAssembly component: {e:#}",
                file.display()
            )
        })?;
        report(&format!(
            "compiled {} in {:.1} s{}",
            file.display(),
            started.elapsed().as_secs_f64(),
            if self.cache_dir.is_some() {
                " (cached for the next start)"
            } else {
                ""
            }
        ));
        if let Some((cache, path)) = cached
            && let Err(e) = cache.store(&component, &path, &source)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled handler");
        }
        Ok(component)
    }
}

/// Native stack above a guest's wasm stack bound, for the host functions it calls.
const HOST_STACK: usize = 4 * 1024 * 1024;

/// The version of the `redstream:handler` WIT package this daemon speaks.
pub const WIT_VERSION: &str = "0.1.2";

/// Components built against any version of this series link (later ones only add to it).
const WIT_SERIES: &str = "0.1.";

/// Why `bytes` cannot be a component, when the first eight bytes tell: not WebAssembly at all, or a
/// core module (what `wasm32-wasip1` and plain `wasm32-unknown-unknown` builds produce).
fn not_a_component(bytes: &[u8]) -> Option<String> {
    if !bytes.starts_with(b"\0asm") {
        return Some("not a WebAssembly file (it does not begin with \\0asm)".into());
    }
    match bytes.get(4..8) {
        Some([1, 0, 0, 0]) => Some(
            "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
             (`cargo build --release --target wasm32-wasip2`), or componentize it (componentize-qjs, \
             componentize-js, componentize-py, `wasm-tools component new`)"
                .into(),
        ),
        _ => None,
    }
}

/// What to do about a component that does not link as a handler, when its imports and exports say:
/// another version of the handler WIT.
fn diagnose(engine: &Engine, component: &Component) -> Option<String> {
    let ty = component.component_type();
    let names: Vec<String> = ty
        .imports(engine)
        .map(|(n, _)| n.to_owned())
        .chain(ty.exports(engine).map(|(n, _)| n.to_owned()))
        .collect();
    let ours = format!("@{WIT_SERIES}");
    if let Some(other) = names
        .iter()
        .find(|n| n.starts_with("redstream:handler") && !n.contains(&ours))
    {
        let version = other.rsplit_once('@').map_or("another version", |(_, v)| v);
        return Some(format!(
            "it was built against redstream:handler@{version} ({other}), and this daemon speaks \
             redstream:handler@{WIT_VERSION}: rebuild it against this release's handlers/wit"
        ));
    }
    None
}

/// The default artifact cache: systemd's `$CACHE_DIRECTORY`, else `$XDG_CACHE_HOME/redstream`, else
/// `~/.cache/redstream`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CACHE_DIRECTORY") {
        return std::env::split_paths(&d).next();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("redstream"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/redstream"))
}

struct Inner {
    /// Tells the workers to drop this handler's warm instances when it is dropped.
    retire: Retirer,
    /// Keeps the epoch ticking for this handler's deadlines.
    _ticker: Arc<Ticker>,
    meta: Arc<Meta>,
    pre: Pre,
    engine: Engine,
    /// The deadline in epoch ticks.
    ticks: u64,
    reuse: Option<u64>,
    /// Distinguishes handlers in the workers' warm-instance caches.
    id: u64,
}

/// How a handler's calls run.
enum Pre {
    /// On the worker threads, with the synchronous API.
    Sync(bindings::HandlerPre<Host>),
    /// As tasks awaiting their host calls (outbound HTTP, state reads), at most `permits` at once.
    Async {
        pre: asynchronous::HandlerPre<Host>,
        /// Taken by [`Handler::admit`] before a call starts.
        permits: Arc<tokio::sync::Semaphore>,
    },
}

/// A loaded handler. Cheap to clone.
#[derive(Clone)]
pub struct WasmHandler {
    inner: Arc<Inner>,
    pool: Pool,
    pub require_sender_token: bool,
    /// SHA-256 of the component file as loaded: a reload tells a rebuilt handler by it.
    pub digest: [u8; 32],
}

/// A warm instance kept by a worker for a reused handler.
struct Warm {
    store: Store<Host>,
    bindings: bindings::Handler,
    uses: u64,
}

thread_local! {
    static WARM: RefCell<HashMap<u64, Warm>> = RefCell::new(HashMap::new());
}

/// Drops this worker's warm instance of handler `id`, returning its slots to the pool.
fn retire_warm(id: u64) {
    WARM.with(|warm| warm.borrow_mut().remove(&id));
}

impl Drop for Inner {
    /// A handler replaced by a reload is dropped once its last message is done: its warm instances
    /// go with it, on every worker.
    fn drop(&mut self) {
        if self.reuse.is_some() {
            self.retire.retire(self.id);
        }
    }
}

impl Inner {
    /// Instantiates in `store`. Should the pool be out of slots, this worker's warm instances (`warm`,
    /// of any handler) are dropped to make room and it tries once more: a full pool is the host's
    /// trouble, never a guest's failure counted against its message.
    fn instantiate(
        &self,
        store: &mut Store<Host>,
        warm: &mut HashMap<u64, Warm>,
    ) -> wasmtime::Result<bindings::Handler> {
        let Pre::Sync(pre) = &self.pre else {
            wasmtime::bail!("an asynchronous handler's instance was asked for on a worker thread");
        };
        match pre.instantiate(&mut *store) {
            Ok(bindings) => Ok(bindings),
            Err(e) if warm.is_empty() => Err(e),
            Err(e) => {
                tracing::warn!(handler = %self.meta.name, error = %e, warm = warm.len(), "could not instantiate; dropping this worker's warm instances and trying again");
                warm.clear();
                pre.instantiate(store)
            }
        }
    }

    fn new_store(&self) -> Store<Host> {
        let mut store = Store::new(&self.engine, Host::new(self.meta.clone()));
        store.limiter(|h| &mut h.limits);
        store
    }

    /// Runs one call on this thread in a fresh instance, and returns with its outcome what the guest
    /// wrote to stdout/stderr and logged (for `redstream handler run`).
    fn call_recorded(
        &self,
        msg: &bindings::redstream::handler::types::Message,
    ) -> (Outcome, Vec<(&'static str, String)>) {
        if let Pre::Async { .. } = self.pre {
            return here(self.call_async(msg, true));
        }
        let mut store = self.new_store();
        store.data_mut().transcript = Some(Vec::new());
        store.data_mut().begin(msg);
        store.set_epoch_deadline(self.ticks);
        let result = WARM
            .with(|warm| self.instantiate(&mut store, &mut warm.borrow_mut()))
            .and_then(|bindings| bindings.call_handle(&mut store, msg));
        let outcome = sandbox::outcome(result, &mut store);
        (
            outcome,
            store.data_mut().transcript.take().unwrap_or_default(),
        )
    }

    /// One call of an asynchronous handler (admitted by its permits, [`Handler::admit`]): instantiated
    /// and run as a task, yielding at every epoch tick, its waits (HTTP, state reads) holding no thread,
    /// the whole within its deadline. With `record`, what the guest wrote and logged too.
    async fn call_async(
        &self,
        msg: &bindings::redstream::handler::types::Message,
        record: bool,
    ) -> (Outcome, Vec<(&'static str, String)>) {
        let Pre::Async { pre, .. } = &self.pre else {
            return (
                Outcome::Retry("a synchronous handler was called as a task".into()),
                Vec::new(),
            );
        };
        let mut store = self.new_store();
        if record {
            store.data_mut().transcript = Some(Vec::new());
        }
        store.data_mut().begin(msg);
        let timeout = self.meta.timeout;
        let deadline = std::time::Instant::now() + timeout;
        store.epoch_deadline_callback(move |_| {
            Ok(if std::time::Instant::now() >= deadline {
                wasmtime::UpdateDeadline::Interrupt
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        store.set_epoch_deadline(1);
        let call = async {
            let bindings = pre.instantiate_async(&mut store).await?;
            bindings.call_handle(&mut store, msg).await
        };
        // A guest waiting on the host runs no wasm, so no tick interrupts it: the clock does.
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(wasmtime::Trap::Interrupt.into()),
        };
        let outcome = sandbox::outcome(result, &mut store);
        (
            outcome,
            store.data_mut().transcript.take().unwrap_or_default(),
        )
    }

    /// Runs one call on this thread.
    fn call(&self, msg: &bindings::redstream::handler::types::Message) -> Outcome {
        if let Pre::Async { .. } = self.pre {
            return here(self.call_async(msg, false)).0;
        }
        match self.reuse {
            None => {
                let mut store = self.new_store();
                store.data_mut().begin(msg);
                store.set_epoch_deadline(self.ticks);
                let result = WARM
                    .with(|warm| self.instantiate(&mut store, &mut warm.borrow_mut()))
                    .and_then(|bindings| bindings.call_handle(&mut store, msg));
                sandbox::outcome(result, &mut store)
            }
            Some(limit) => WARM.with(|warm| {
                let mut warm = warm.borrow_mut();
                let entry = match warm.remove(&self.id) {
                    Some(w) => w,
                    None => {
                        let mut store = self.new_store();
                        store.set_epoch_deadline(self.ticks);
                        match self.instantiate(&mut store, &mut warm) {
                            Ok(bindings) => Warm {
                                store,
                                bindings,
                                uses: 0,
                            },
                            Err(e) => return sandbox::outcome(Err(e), &mut store),
                        }
                    }
                };
                let Warm {
                    mut store,
                    bindings,
                    uses,
                } = entry;
                store.data_mut().begin(msg);
                // Deadlines count from the current epoch: re-arm before every call.
                store.set_epoch_deadline(self.ticks);
                let result = bindings.call_handle(&mut store, msg);
                let trapped = result.is_err();
                let outcome = sandbox::outcome(result, &mut store);
                // After a trap an instance refuses further calls: retire it, as after `limit` uses.
                if !trapped && uses + 1 < limit {
                    warm.insert(
                        self.id,
                        Warm {
                            store,
                            bindings,
                            uses: uses + 1,
                        },
                    );
                }
                outcome
            }),
        }
    }
}

/// Runs an asynchronous call to its end on this thread (a local `handler run`, outside any runtime).
fn here<T>(call: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(call)
}

impl WasmHandler {
    pub fn name(&self) -> &str {
        &self.inner.meta.name
    }

    /// One call without the worker pool, on this thread (for `redstream handler run` and benchmarks).
    pub fn call_here(&self, msg: &Message, sender: Option<&Sender>) -> Outcome {
        match sandbox::wit_message(msg, sender) {
            Ok(m) => self.inner.call(&m),
            Err(reason) => Outcome::Reject(reason),
        }
    }

    /// [`WasmHandler::call_here`] in a fresh instance, with what the guest wrote and logged — a
    /// panic's message included — as (where, text).
    pub fn call_recorded(
        &self,
        msg: &Message,
        sender: Option<&Sender>,
    ) -> (Outcome, Vec<(&'static str, String)>) {
        match sandbox::wit_message(msg, sender) {
            Ok(m) => self.inner.call_recorded(&m),
            Err(reason) => (Outcome::Reject(reason), Vec::new()),
        }
    }

    /// One call on a worker thread, or as a task for an asynchronous handler.
    pub async fn call(&self, msg: &Message, sender: Option<&Sender>) -> Outcome {
        let m = match sandbox::wit_message(msg, sender) {
            Ok(m) => m,
            Err(reason) => return Outcome::Reject(reason),
        };
        if let Pre::Async { .. } = self.inner.pre {
            return self.inner.call_async(&m, false).await.0;
        }
        let inner = self.inner.clone();
        match self.pool.run(move || inner.call(&m)).await {
            Some(outcome) => outcome,
            None => Outcome::Retry(
                "the handler call failed in the host (workers stopping, or a host panic)".into(),
            ),
        }
    }
}

impl Handler for WasmHandler {
    fn name(&self) -> &str {
        &self.inner.meta.name
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(self.call(msg, msg.sender.as_deref()))
    }

    /// A handler running as tasks takes at most `concurrency` calls at once.
    fn admit(&self) -> BoxFuture<'static, Admission> {
        match &self.inner.pre {
            Pre::Sync(_) => Box::pin(std::future::ready(None)),
            Pre::Async { permits, .. } => {
                let permits = permits.clone();
                Box::pin(async move {
                    // The semaphore is never closed.
                    let permit = permits.acquire_owned().await.ok()?;
                    Some(Box::new(permit) as Box<dyn Send>)
                })
            }
        }
    }

    /// Calls on worker threads take batches; asynchronous ones run one task per message.
    fn batch(&self) -> Option<&dyn BatchHandler> {
        match self.inner.pre {
            Pre::Sync(_) => Some(self),
            Pre::Async { .. } => None,
        }
    }
}

/// Smallest chunk of a batch handed to one worker: fewer hand-offs beat finer spreading.
const MIN_CHUNK: usize = 16;

impl BatchHandler for WasmHandler {
    /// Splits the batch into one chunk per worker; each worker calls its messages in order, lending
    /// each message's fields to the guest (no copies), and reports its chunk at once.
    fn run_batch(&self, msgs: Vec<Message>, span: tracing::Span, done: BatchDone) {
        let chunk = msgs.len().div_ceil(self.pool.workers).max(MIN_CHUNK);
        let mut msgs = msgs.into_iter().peekable();
        while msgs.peek().is_some() {
            let part: Vec<Message> = msgs.by_ref().take(chunk).collect();
            let (inner, done, span) = (self.inner.clone(), done.clone(), span.clone());
            let job: Job = Box::new(move || {
                // The guest's log lines carry the loop's stream, group and consumer.
                let _in_loop = span.enter();
                let mut results = Vec::with_capacity(part.len());
                // One clock read per call: each call ends where the next one starts.
                let mut started = std::time::Instant::now();
                for msg in part {
                    let (msg, outcome) = match sandbox::lend(msg) {
                        Ok((wit, lent)) => {
                            let outcome =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    inner.call(&wit)
                                }))
                                .unwrap_or_else(|_| {
                                    Outcome::Retry("the handler call panicked in the host".into())
                                });
                            (sandbox::give_back(wit, lent), outcome)
                        }
                        Err((msg, reason)) => (msg, Outcome::Reject(reason)),
                    };
                    let ended = std::time::Instant::now();
                    results.push((msg, outcome, ended - started));
                    started = ended;
                }
                done(results);
            });
            if let Err(crossbeam_channel::SendError(job)) = self.pool.tx.send(job) {
                // The workers are gone (the daemon is exiting): run here rather than lose the results.
                job();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_wit_version_is_the_one_in_handlers_wit() {
        let wit = include_str!("../../../handlers/wit/handler.wit");
        assert!(
            wit.contains(&format!(
                "package redstream:handler@{};",
                super::WIT_VERSION
            )),
            "handlers/wit/handler.wit names another version"
        );
    }
}
