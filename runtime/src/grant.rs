//! What a step may touch: its grant. Everything a step or its commands can reach is named here;
//! what is not named is out of reach.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::ArtifactStore;
use crate::confine::Confinement;
use crate::logs::LogLimits;
use crate::trigger::{LocalTriggers, Triggers};

/// Limits of one step run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for the whole step, commands included. Past it, the step is an EXCEPTION.
    pub deadline: Duration,
    /// Largest linear memory a guest (the step, and each observer) may grow to, in bytes.
    pub memory_bytes: usize,
    /// Log limits.
    pub logs: LogLimits,
    /// Largest property value a guest may set, in bytes of JSON.
    pub max_property_bytes: usize,
    /// Largest file a step may upload or download, in bytes.
    pub max_artifact_bytes: u64,
    /// Largest chunk of text one host call may carry; a guest passing more traps.
    pub max_call_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_secs(3600),
            memory_bytes: 512 << 20,
            logs: LogLimits::default(),
            max_property_bytes: 1 << 20,
            max_artifact_bytes: 2 << 30,
            max_call_bytes: 16 << 20,
        }
    }
}

/// Everything a step is allowed: files, programs, environment, secrets and limits.
#[derive(Clone)]
pub struct Grant {
    /// The build's workdir: preopened read-write as "." for the step; the cwd of its commands.
    pub workdir: PathBuf,
    /// Directories the step may read (a toolchain, say), preopened read-only at the same path.
    pub ro_dirs: Vec<PathBuf>,
    /// The environment of the step and of its commands. `PATH` defaults to
    /// `/usr/local/bin:/usr/bin:/bin` and `HOME` to the workdir.
    pub env: BTreeMap<String, String>,
    /// Programs the step may run: bare names looked up on `PATH`, or absolute paths. Granting a
    /// shell (`sh`, `bash`) grants everything the shell can run.
    pub programs: Vec<String>,
    /// Secrets (name, value): usable in arguments as `%(secret:NAME)s`, redacted everywhere.
    pub secrets: BTreeMap<String, String>,
    /// Limits.
    pub limits: Limits,
    /// Whether commands may use the network. Only enforced when commands are confined (sandbox
    /// mode). The guest itself never has network access.
    pub command_network: bool,
    /// Sandbox mode: confine every command (Landlock, seccomp, rlimits). `None` runs commands
    /// as the worker's user, limited only by the program list, environment and time limits.
    pub confinement: Option<Arc<Confinement>>,
    /// The farm's file store (locally, a directory).
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Where trigger requests go (locally, nowhere: [`LocalTriggers`]).
    pub triggers: Arc<dyn Triggers>,
}

impl Grant {
    /// A grant of the workdir alone: no programs, no extra directories, default limits.
    pub fn new(workdir: impl Into<PathBuf>, artifacts: Arc<dyn ArtifactStore>) -> Self {
        Grant {
            workdir: workdir.into(),
            ro_dirs: Vec::new(),
            env: BTreeMap::new(),
            programs: Vec::new(),
            secrets: BTreeMap::new(),
            limits: Limits::default(),
            command_network: false,
            confinement: None,
            artifacts,
            triggers: Arc::new(LocalTriggers),
        }
    }

    /// The environment commands get: the grant's, with PATH and HOME filled in.
    pub(crate) fn command_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        env.entry("HOME".into())
            .or_insert_with(|| self.workdir.display().to_string());
        env
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are never printed, not even in debug output.
        f.debug_struct("Grant")
            .field("workdir", &self.workdir)
            .field("ro_dirs", &self.ro_dirs)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("programs", &self.programs)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("limits", &self.limits)
            .field("command_network", &self.command_network)
            .field("sandbox", &self.confinement.is_some())
            .finish_non_exhaustive()
    }
}
