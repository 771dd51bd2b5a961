//! The runtime: one wasmtime `Engine` per process, an epoch ticker for wall-clock deadlines,
//! linkers for the step, observer and policy worlds, and components compiled once and cached (in
//! memory, and on disk keyed by the SHA-256 of their bytes and the engine's compatibility hash).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::Digest as _;
use wasmtime::component::{Component as WasmComponent, Linker};
use wasmtime::{Config, Engine};

use crate::bindings::observer::LogObserverPre;
use crate::bindings::policy::FarmPolicyPre;
use crate::bindings::step::StepPre;
use crate::host::{ObserverState, PolicyState, StepState};
use crate::policy::{PolicyComponent, PolicyLimits};

/// How often the epoch advances. Deadlines are checked on each tick, so a runaway guest is
/// stopped at most this late.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The version of the contract this runtime implements.
pub const CONTRACT: &str = "kiln:step@0.1.0";

/// SHA-256 of a component's bytes: its identity in caches.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModuleDigest(pub [u8; 32]);

impl ModuleDigest {
    /// The digest of these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        ModuleDigest(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ModuleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleDigest({self})")
    }
}

/// Why a component could not be loaded. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Unreadable(String, std::io::Error),
    /// Not WebAssembly at all.
    #[error(
        "{0} is not a WebAssembly file (it does not start with \\0asm); give the .wasm file cargo built"
    )]
    NotWasm(String),
    /// A core module rather than a component.
    #[error(
        "{0} is a core WebAssembly module, not a component; build the step with `cargo build --target wasm32-wasip2` \
         (not wasm32-unknown-unknown or wasm32-wasip1)"
    )]
    CoreModule(String),
    /// Wasmtime rejected it.
    #[error("{0} is not a valid component: {1}")]
    Invalid(String, String),
    /// It imports something the contract does not offer.
    #[error(
        "{0} imports `{1}`, which Kiln does not provide; steps and observers may import only {CONTRACT} interfaces \
         and WASI 0.2, policies only WASI 0.2 (rebuild against this guest-sdk)"
    )]
    UnknownImport(String, String),
    /// It is a component of another world or version.
    #[error("{0} is not a Kiln step, observer or policy: {1}")]
    WrongWorld(String, String),
    /// It is a Kiln component, but not of the kind asked for (a step given as a policy).
    #[error("{label} is {} {found}, not {} {wanted}; {}", article(.found), article(.wanted), kind_hint(.wanted))]
    WrongKind {
        /// The component's label.
        label: String,
        /// What it is: "step", "observer" or "policy".
        found: &'static str,
        /// What was asked for.
        wanted: &'static str,
    },
    /// The compiled-component cache failed.
    #[error("component cache {0}: {1}")]
    Cache(PathBuf, String),
}

/// "a" or "an", for the kind of a component.
fn article(kind: &str) -> &'static str {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// How a component of each kind is made, for error messages.
fn kind_hint(kind: &str) -> &'static str {
    match kind {
        "step" => "a step exports `run` (world `step`, guest_sdk::step!)",
        "observer" => {
            "an observer exports `kiln:step/observer@0.1.0` (world `log-observer`, guest_sdk::observer!)"
        }
        _ => "a policy exports `kiln:step/policy@0.1.0` (world `farm-policy`, guest_sdk::policy!)",
    }
}

/// A loaded step component, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct StepComponent {
    pub(crate) digest: ModuleDigest,
    pub(crate) pre: StepPre<StepState>,
}

/// A loaded observer component, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct ObserverComponent {
    pub(crate) digest: ModuleDigest,
    pub(crate) pre: LogObserverPre<ObserverState>,
}

/// A loaded component of any of the three worlds.
#[derive(Clone)]
pub enum Loaded {
    /// A build step.
    Step(StepComponent),
    /// A log observer.
    Observer(ObserverComponent),
    /// A farm policy: the master's customization hooks.
    Policy(PolicyComponent),
}

impl Loaded {
    /// The SHA-256 of the component's bytes.
    pub fn digest(&self) -> ModuleDigest {
        match self {
            Loaded::Step(s) => s.digest,
            Loaded::Observer(o) => o.digest,
            Loaded::Policy(p) => p.digest(),
        }
    }

    /// "step", "observer" or "policy".
    pub fn kind(&self) -> &'static str {
        match self {
            Loaded::Step(_) => "step",
            Loaded::Observer(_) => "observer",
            Loaded::Policy(_) => "policy",
        }
    }
}

impl StepComponent {
    /// The SHA-256 of the component's bytes.
    pub fn digest(&self) -> ModuleDigest {
        self.digest
    }
}

impl ObserverComponent {
    /// The SHA-256 of the component's bytes.
    pub fn digest(&self) -> ModuleDigest {
        self.digest
    }
}

/// Settings of a [`Runtime`].
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
}

impl RuntimeConfig {
    /// The compile cache every Kiln command uses unless told otherwise:
    /// `$XDG_CACHE_HOME/kiln/components`, else `~/.cache/kiln/components`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("kiln").join("components"))
    }
}

/// The thread that advances the engine's epoch, on which every deadline depends. The runtime
/// and every [`PolicyComponent`] hold it, so a policy called after its runtime is gone still
/// has a deadline. The last holder stops it.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("kiln-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?
        };
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The wasmtime host. Create one per process and share it: it owns the engine, the epoch
/// ticker and the component caches. Runs are independent: each gets fresh stores.
pub struct Runtime {
    pub(crate) engine: Engine,
    step_linker: Linker<StepState>,
    observer_linker: Linker<ObserverState>,
    policy_linker: Linker<PolicyState>,
    cache_dir: Option<PathBuf>,
    compat: String,
    loaded: Mutex<HashMap<ModuleDigest, Loaded>>,
    ticker: Arc<EpochTicker>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine and linkers and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&wasm)?;

        let mut step_linker = Linker::<StepState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut step_linker)?;
        crate::host::add_step_imports(&mut step_linker)?;
        let mut observer_linker = Linker::<ObserverState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut observer_linker)?;
        crate::host::add_observer_imports(&mut observer_linker)?;
        // A policy gets WASI only because the standard library links against it; its context
        // is empty (see `PolicyComponent::call`).
        let mut policy_linker = Linker::<PolicyState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut policy_linker)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());

        if let Some(dir) = &config.cache_dir {
            prepare_cache_dir(dir)
                .map_err(|e| anyhow::anyhow!("component cache {}: {e}", dir.display()))?;
        }

        let ticker = Arc::new(EpochTicker::start(engine.clone())?);
        Ok(Runtime {
            engine,
            step_linker,
            observer_linker,
            policy_linker,
            cache_dir: config.cache_dir,
            compat,
            loaded: Mutex::new(HashMap::new()),
            ticker,
        })
    }

    /// Loads a component file; see [`Runtime::load`].
    pub fn load_file(&self, path: &Path) -> Result<Loaded, LoadError> {
        let label = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| LoadError::Unreadable(label.clone(), e))?;
        self.load(&bytes, &label)
    }

    /// Loads a component (compiling it, or taking it from the caches), checks which world it
    /// implements, and prepares it for instantiation. `label` names it in errors.
    pub fn load(&self, bytes: &[u8], label: &str) -> Result<Loaded, LoadError> {
        let digest = ModuleDigest::of(bytes);
        if let Some(hit) = self.loaded.lock().expect("cache lock").get(&digest) {
            return Ok(hit.clone());
        }
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm(label.to_owned()));
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule(label.to_owned()));
        }
        let component = self.compile_cached(bytes, digest, label)?;
        let loaded = self.classify(&component, digest, label)?;
        self.loaded
            .lock()
            .expect("cache lock")
            .insert(digest, loaded.clone());
        Ok(loaded)
    }

    /// Loads a policy component; see [`Runtime::load`]. Any other kind of component is refused
    /// with a message saying what it is and how a policy is made.
    pub fn load_policy(&self, bytes: &[u8], label: &str) -> Result<PolicyComponent, LoadError> {
        match self.load(bytes, label)? {
            Loaded::Policy(p) => Ok(p),
            other => Err(LoadError::WrongKind {
                label: label.to_owned(),
                found: other.kind(),
                wanted: "policy",
            }),
        }
    }

    fn compile_cached(
        &self,
        bytes: &[u8],
        digest: ModuleDigest,
        label: &str,
    ) -> Result<WasmComponent, LoadError> {
        let Some(dir) = &self.cache_dir else {
            return WasmComponent::new(&self.engine, bytes)
                .map_err(|e| LoadError::Invalid(label.to_owned(), format!("{e:#}")));
        };
        let path = dir.join(format!("{digest}-{}.cwasm", self.compat));
        if path.is_file() {
            // SAFETY: the file was written by `serialize` below into a directory only this
            // runtime's user can write (checked by prepare_cache_dir), under a name that includes
            // the SHA-256 of the source bytes and the engine's compatibility hash.
            match unsafe { WasmComponent::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached component")
                }
            }
        }
        let started = std::time::Instant::now();
        let component = WasmComponent::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(label.to_owned(), format!("{e:#}")))?;
        tracing::debug!(module = %label, %digest, elapsed_ms = started.elapsed().as_millis() as u64, "compiled component");
        let compiled = component
            .serialize()
            .map_err(|e| LoadError::Cache(dir.clone(), e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut tmp, &compiled)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            // A cache that cannot be written costs time, not correctness.
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled component");
        }
        Ok(component)
    }

    fn classify(
        &self,
        component: &WasmComponent,
        digest: ModuleDigest,
        label: &str,
    ) -> Result<Loaded, LoadError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let is_step = exports.iter().any(|e| e == "run");
        let export_of = |interface: &str| {
            let prefix = format!("kiln:step/{interface}@");
            let export = exports.iter().find(|e| e.starts_with(&prefix))?;
            let wanted = CONTRACT.replacen('@', &format!("/{interface}@"), 1);
            if *export != wanted {
                return Some(Err(LoadError::WrongWorld(
                    label.to_owned(),
                    format!(
                        "it exports `{export}`, but this runtime implements {CONTRACT}; rebuild it against this guest-sdk"
                    ),
                )));
            }
            Some(Ok(()))
        };
        let link_error = |e: wasmtime::Error| {
            let text = format!("{e:#}");
            match text.split('`').nth(1) {
                Some(name) if text.contains("matching implementation was not found") => {
                    LoadError::UnknownImport(label.to_owned(), name.to_owned())
                }
                _ => LoadError::WrongWorld(label.to_owned(), text),
            }
        };
        if is_step {
            let pre = self
                .step_linker
                .instantiate_pre(component)
                .map_err(link_error)?;
            let pre = StepPre::new(pre)
                .map_err(|e| LoadError::WrongWorld(label.to_owned(), format!("{e:#}")))?;
            return Ok(Loaded::Step(StepComponent { digest, pre }));
        }
        if let Some(matched) = export_of("observer") {
            matched?;
            let pre = self
                .observer_linker
                .instantiate_pre(component)
                .map_err(link_error)?;
            let pre = LogObserverPre::new(pre)
                .map_err(|e| LoadError::WrongWorld(label.to_owned(), format!("{e:#}")))?;
            return Ok(Loaded::Observer(ObserverComponent { digest, pre }));
        }
        if let Some(matched) = export_of("policy") {
            matched?;
            let pre = self
                .policy_linker
                .instantiate_pre(component)
                .map_err(link_error)?;
            let pre = FarmPolicyPre::new(pre)
                .map_err(|e| LoadError::WrongWorld(label.to_owned(), format!("{e:#}")))?;
            return Ok(Loaded::Policy(PolicyComponent {
                digest,
                pre,
                limits: PolicyLimits::default(),
                _ticker: self.ticker.clone(),
            }));
        }
        let shown = if exports.is_empty() {
            "nothing".to_owned()
        } else {
            exports.join(", ")
        };
        Err(LoadError::WrongWorld(
            label.to_owned(),
            format!(
                "it exports {shown}; {}, {} and {}",
                kind_hint("step"),
                kind_hint("observer"),
                kind_hint("policy")
            ),
        ))
    }
}

/// Creates the cache directory (mode 0700) and checks that nobody else can write it: compiled
/// code loaded from it runs without validation.
fn prepare_cache_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory (or a symlink)"));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(std::io::Error::other(
            "owned by another user; the cache must be the runtime's own",
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(std::io::Error::other(
            "writable by group or others; run chmod 700 on it",
        ));
    }
    Ok(())
}
