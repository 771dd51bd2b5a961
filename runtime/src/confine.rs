//! Sandbox mode: confinement of the commands a step runs.
//!
//! The threaded host never confines itself. Instead each command is started through a small
//! re-exec helper: the host runs its own binary (or `kiln-confine`) with [`HELPER_ARG`], a
//! policy and the command; the helper, single-threaded and fresh, applies rlimits, a Landlock
//! ruleset (system directories read-only, the workdir and a private temporary directory
//! read-write, TCP bind/connect denied, signals and abstract sockets scoped) and a seccomp
//! denylist (kernel-attack surface, and IP sockets when the network is off), then `exec`s the
//! command. A kernel that cannot enforce this is refused at start by [`Confinement::probe`].

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The first argument that turns a Kiln binary into the confinement helper.
pub const HELPER_ARG: &str = "__kiln-confine";

/// The oldest Landlock ABI sandbox mode accepts: 4 is the first that can deny TCP.
pub const MIN_LANDLOCK_ABI: i32 = 4;

/// System directories a confined command may read and execute from, when they exist. `/etc` is
/// granted entry by entry (see [`ETC_WITHHELD`]); `/dev` device by device; `/run`, `/home`,
/// `/root`, `/var` and `/tmp` not at all.
const SYSTEM_RO: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/proc", "/sys",
];

/// Entries of `/etc` a confined command may not read, even on a worker running as root.
const ETC_WITHHELD: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "sudoers",
    "sudoers.d",
    "ssh",
    "ssl",
    "kiln",
    "security",
    "credstore",
    "credstore.encrypted",
    "machine-id",
];

/// Devices a confined command may read.
const DEVICES_RO: &[&str] = &["/dev/random", "/dev/urandom"];

/// Devices a confined command may read and write.
const DEVICES_RW: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// Why sandbox mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The kernel has no usable Landlock.
    #[error(
        "sandbox mode needs Landlock ABI {MIN_LANDLOCK_ABI} or newer (Linux 6.7+) to confine commands' files and network, \
         but {0}; enable Landlock (CONFIG_SECURITY_LANDLOCK=y and `landlock` in the kernel's lsm= list) \
         or run without --sandbox, for trusted builds only"
    )]
    Landlock(String),
    /// The kernel has no seccomp filter support.
    #[error(
        "sandbox mode needs seccomp filters (CONFIG_SECCOMP_FILTER), which this kernel lacks: {0}"
    )]
    Seccomp(String),
    /// The helper cannot be run.
    #[error("the confinement helper {0} cannot be run: {1}")]
    Helper(PathBuf, String),
}

/// How to start the confinement helper: a program, and whether it needs [`HELPER_ARG`] first
/// (a Kiln binary re-executing itself) or is the dedicated `kiln-confine` binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helper {
    /// The helper binary.
    pub program: PathBuf,
    /// Whether to pass [`HELPER_ARG`] as the first argument.
    pub reexec: bool,
}

impl Helper {
    /// The running binary, re-executed with [`HELPER_ARG`]. Its `main` must call
    /// [`run_helper_if_requested`] first.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Helper {
            program: std::env::current_exe()?,
            reexec: true,
        })
    }

    /// The dedicated `kiln-confine` binary at this path.
    pub fn dedicated(program: impl Into<PathBuf>) -> Self {
        Helper {
            program: program.into(),
            reexec: false,
        }
    }
}

/// Sandbox mode, after checking the kernel can enforce it.
#[derive(Debug, Clone)]
pub struct Confinement {
    helper: Helper,
    landlock_abi: i32,
}

/// The policy the helper applies, passed to it as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Policy {
    /// Read-write directories (the workdir, the private temporary directory).
    pub rw: Vec<PathBuf>,
    /// Extra read-only directories (the grant's).
    pub ro: Vec<PathBuf>,
    /// Whether the network is allowed.
    pub network: bool,
}

impl Confinement {
    /// Checks that this kernel can confine commands, and returns sandbox mode using `helper`.
    pub fn probe(helper: Helper) -> Result<Self, ConfineError> {
        let abi = landlock_abi();
        if abi < MIN_LANDLOCK_ABI {
            let why = if abi <= 0 {
                "this kernel does not offer Landlock".to_owned()
            } else {
                format!("this kernel offers only ABI {abi}")
            };
            return Err(ConfineError::Landlock(why));
        }
        // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
            return Err(ConfineError::Seccomp(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        let meta = std::fs::metadata(&helper.program)
            .map_err(|e| ConfineError::Helper(helper.program.clone(), e.to_string()))?;
        if !meta.is_file() {
            return Err(ConfineError::Helper(
                helper.program.clone(),
                "not a file".into(),
            ));
        }
        Ok(Confinement {
            helper,
            landlock_abi: abi,
        })
    }

    /// The Landlock ABI this kernel enforces (the worker advertises it).
    pub fn landlock_abi(&self) -> i32 {
        self.landlock_abi
    }

    /// A command that runs `program` with `argv` under `policy`.
    pub(crate) fn command(&self, policy: &Policy, program: &Path, argv: &[String]) -> Command {
        let mut cmd = Command::new(&self.helper.program);
        if self.helper.reexec {
            cmd.arg(HELPER_ARG);
        }
        cmd.arg(serde_json::to_string(policy).expect("policy serializes"))
            .arg(program)
            .args(argv);
        cmd
    }
}

/// The Landlock ABI version the kernel offers (0 or less: none).
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer and size 0, this flag only queries the version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(v).unwrap_or(-1)
}

/// If this process was started as the confinement helper, confine and exec the command (never
/// returning). Call it first thing in `main` of every binary that hosts the runtime.
pub fn run_helper_if_requested() {
    let mut args = std::env::args_os();
    let _self = args.next();
    if args.next().as_deref() == Some(std::ffi::OsStr::new(HELPER_ARG)) {
        helper_main(args.collect());
    }
}

/// The helper proper: `POLICY-JSON PROGRAM ARGV0 ARGS...`. Exits 126 if it cannot confine.
pub fn helper_main(args: Vec<OsString>) -> ! {
    let fail = |msg: String| -> ! {
        eprintln!("kiln-confine: {msg}");
        std::process::exit(126)
    };
    let [policy, program, argv0, rest @ ..] = args.as_slice() else {
        fail("usage: kiln-confine POLICY-JSON PROGRAM ARGV0 [ARGS...]".into())
    };
    let policy: Policy = serde_json::from_str(&policy.to_string_lossy())
        .unwrap_or_else(|e| fail(format!("bad policy: {e}")));
    if let Err(e) = set_rlimits() {
        fail(format!("cannot set resource limits: {e}"));
    }
    if let Err(e) = apply_landlock(&policy) {
        fail(format!("cannot apply Landlock: {e}"));
    }
    if let Err(e) = apply_seccomp(policy.network) {
        fail(format!("cannot apply seccomp: {e}"));
    }
    let err = Command::new(program).arg0(argv0).args(rest).exec();
    fail(format!(
        "cannot execute {}: {err}",
        Path::new(program).display()
    ))
}

fn set_rlimits() -> rustix::io::Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // No core dumps of build processes (they may hold secrets, and they fill disks).
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    // Bound runaway process creation (for non-root workers; root is exempt by the kernel).
    let nproc = getrlimit(Resource::Nproc);
    let cap = 4096;
    if nproc.maximum.is_none_or(|m| m > cap) {
        setrlimit(
            Resource::Nproc,
            Rlimit {
                current: Some(cap),
                maximum: Some(cap),
            },
        )?;
    }
    Ok(())
}

fn apply_landlock(policy: &Policy) -> Result<(), landlock::RulesetError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
    };
    let abi = ABI::from(landlock_abi());
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))?;
    if !policy.network {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi))?;
    }
    // /etc entry by entry, so that secrets readable by the worker's user stay out of reach. The
    // public certificate bundle under /etc/ssl/certs is kept.
    let etc: Vec<PathBuf> = std::fs::read_dir("/etc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| !ETC_WITHHELD.contains(&&*e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .chain(std::iter::once(PathBuf::from("/etc/ssl/certs")))
                .collect()
        })
        .unwrap_or_default();
    let ro: Vec<&Path> = SYSTEM_RO
        .iter()
        .chain(DEVICES_RO)
        .map(Path::new)
        .chain(etc.iter().map(PathBuf::as_path))
        .chain(policy.ro.iter().map(PathBuf::as_path))
        .collect();
    let rw: Vec<&Path> = DEVICES_RW
        .iter()
        .map(Path::new)
        .chain(policy.rw.iter().map(PathBuf::as_path))
        .collect();
    let status = ruleset
        .create()?
        .add_rules(path_beneath_rules(ro, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(rw, AccessFs::from_all(abi)))?
        .restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        // HardRequirement makes partial enforcement an error above; this is a second guard.
        panic!("Landlock ruleset not fully enforced: {:?}", status.ruleset);
    }
    Ok(())
}

/// System calls a build has no business making: they attack the kernel or escape confinement.
const DENIED_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

fn apply_seccomp(network: bool) -> Result<(), Box<dyn std::error::Error>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|&s| (s, Vec::new())).collect();
    if !network {
        // Landlock covers TCP; this closes UDP, raw and packet sockets, and UNIX sockets, whose
        // connect() to a named socket (say, a container engine's) no Landlock ABI governs.
        // socketpair() stays available for a program's own IPC.
        let family = |f: libc::c_int| -> Result<SeccompRule, seccompiler::BackendError> {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                f as u64,
            )?])
        };
        let families = [
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_PACKET,
            libc::AF_UNIX,
            libc::AF_NETLINK,
        ];
        rules.insert(
            libc::SYS_socket,
            families.into_iter().map(family).collect::<Result<_, _>>()?,
        );
    }
    let arch = std::env::consts::ARCH.try_into()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}
