//! `run-command`: runs a granted program in the workdir with a constructed environment, streams
//! its output into a log as it arrives, and kills its whole process group at its timeout, the
//! step's deadline, or on cancel. In sandbox mode the program is started through the
//! confinement helper.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::bindings::HostError;
use crate::bindings::step::kiln::step::context::{Command, CommandResult, Exit};
use crate::confine::Policy;
use crate::files;
use crate::host::ContextState;
use crate::host::context::check_log_name;
use crate::host::usage::{RssWatch, SAMPLE_EVERY, wait_with_usage};
use crate::logs::Channel;
use crate::run::human_duration;

/// Largest argv plus environment a command may be given.
const MAX_COMMAND_BYTES: usize = 1 << 20;
/// Largest capture of standard output.
const MAX_CAPTURE: u32 = 16 << 20;
/// Most logfiles one command may follow.
const MAX_LOGFILES: usize = 16;
/// How often followed logfiles are read.
const TAIL_EVERY: Duration = Duration::from_millis(100);
/// How often observers see the lines batched for them while a command runs, however few:
/// their progress reports are what the master's estimates go by, and a command that prints a
/// little and then works for an hour must not leave them unseen until it ends.
const OBSERVE_EVERY: Duration = Duration::from_millis(500);
/// Most bytes read from one followed logfile per tick, so one file cannot starve the command's
/// own output.
const TAIL_BYTES: usize = 4 << 20;
/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 64 * 1024;
/// How often a running command checks for cancellation when it is quiet.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// After the command exits, how long its pipes may stay open (held by a process that escaped
/// its process group) before Kiln stops reading them.
const PIPE_GRACE: Duration = Duration::from_secs(2);

impl ContextState {
    pub(crate) fn run(&mut self, cmd: Command) -> Result<CommandResult, HostError> {
        let Command {
            argv,
            cwd,
            env: extra_env,
            timeout_ms,
            log,
            quiet,
            capture_stdout,
            stdin,
            logfiles,
        } = cmd;
        if argv.is_empty() {
            return Err(HostError::Invalid(
                "argv is empty: give the program and its arguments".into(),
            ));
        }
        let size: usize = argv.iter().map(String::len).sum::<usize>()
            + extra_env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + stdin.as_ref().map_or(0, String::len);
        if size > MAX_COMMAND_BYTES {
            return Err(HostError::TooLarge(format!(
                "the command's argv, environment and stdin are {size} bytes; the limit is {MAX_COMMAND_BYTES}"
            )));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(HostError::Invalid("an argument contains a NUL byte".into()));
        }
        if capture_stdout > MAX_CAPTURE {
            return Err(HostError::TooLarge(format!(
                "capture-stdout asks for {capture_stdout} bytes; the limit is {MAX_CAPTURE}"
            )));
        }
        let log = log.unwrap_or_else(|| "stdio".to_owned());
        check_log_name(&log)?;
        if !self.logs.can_open(&log) {
            return Err(HostError::TooLarge(format!(
                "a step may have at most {} logs",
                self.grant.limits.logs.max_logs
            )));
        }

        if logfiles.len() > MAX_LOGFILES {
            return Err(HostError::TooLarge(format!(
                "a command may follow at most {MAX_LOGFILES} logfiles"
            )));
        }
        let mut followed = Vec::with_capacity(logfiles.len());
        for (name, path) in logfiles {
            check_log_name(&name)?;
            if !self.logs.can_open(&name) {
                return Err(HostError::TooLarge(format!(
                    "a step may have at most {} logs",
                    self.grant.limits.logs.max_logs
                )));
            }
            let rel = files::check_relative(&path)
                .map_err(HostError::Invalid)?
                .to_path_buf();
            followed.push(Followed {
                log: name,
                rel,
                file: None,
            });
        }

        let mut env = self.grant.command_env();
        for (name, value) in extra_env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(HostError::Invalid(format!(
                    "environment variable {name:?} is malformed"
                )));
            }
            if name.starts_with("LD_") {
                return Err(HostError::Denied(format!(
                    "environment variable {name} would let the step load code into a granted program; loader variables are not allowed"
                )));
            }
            env.insert(name, value);
        }
        let program = resolve_program(&self.grant.programs, &argv[0], &env["PATH"])?;
        let cwd_rel = cwd.unwrap_or_else(|| ".".to_owned());
        let rel = files::check_relative(&cwd_rel).map_err(HostError::Invalid)?;
        files::check_dir(&self.workdir, rel)
            .map_err(|e| HostError::NotFound(format!("working directory: {e}")))?;
        let cwd_path = self.grant.workdir.join(rel);

        let mut command = match self.grant.confinement.clone() {
            Some(confinement) => {
                if self.tmpdir.is_none() {
                    self.tmpdir = Some(
                        tempfile::Builder::new()
                            .prefix("kiln-tmp-")
                            .tempdir()
                            .map_err(|e| {
                                HostError::Io(format!("private temporary directory: {e}"))
                            })?,
                    );
                }
                let tmp = self
                    .tmpdir
                    .as_ref()
                    .expect("created above")
                    .path()
                    .to_path_buf();
                env.insert("TMPDIR".into(), tmp.display().to_string());
                let policy = Policy {
                    rw: vec![self.grant.workdir.clone(), tmp],
                    ro: self.grant.ro_dirs.clone(),
                    network: self.grant.command_network,
                };
                confinement.command(&policy, &program, &argv)
            }
            None => {
                let mut c = std::process::Command::new(&program);
                c.arg0(&argv[0]).args(&argv[1..]);
                c
            }
        };
        command
            .env_clear()
            .envs(&env)
            .current_dir(&cwd_path)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);

        let now = Instant::now();
        let remaining = self.deadline.saturating_duration_since(now);
        let limit = timeout_ms.map_or(remaining, |ms| Duration::from_millis(ms).min(remaining));

        let mut header = format!("$ {}\n", shell_words(&argv));
        if cwd_rel != "." {
            header.push_str(&format!(" in dir {cwd_rel}\n"));
        }
        if let Some(ms) = timeout_ms {
            header.push_str(&format!(
                " timeout {}\n",
                human_duration(Duration::from_millis(ms))
            ));
        }
        if self.grant.confinement.is_some() {
            header.push_str(" confined (sandbox mode)\n");
        }
        for f in &followed {
            header.push_str(&format!(
                " following {} into log {}\n",
                f.rel.display(),
                f.log
            ));
        }
        self.write(&log, Channel::Header, header.as_bytes());

        let started = Instant::now();
        let mut child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                HostError::NotFound(format!("cannot start {}: {e}", program.display()))
            }
            _ => HostError::Io(format!("cannot start {}: {e}", program.display())),
        })?;
        let pid = Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
        let mut rss = RssWatch::start(pid);
        let mut next_sample = Instant::now() + SAMPLE_EVERY;
        let mut next_observe = Instant::now() + OBSERVE_EVERY;
        let feeder = match (child.stdin.take(), stdin) {
            (Some(mut pipe), Some(text)) => Some(std::thread::spawn(move || {
                // A command that exits without reading its input breaks the pipe; that is fine.
                let _ = pipe.write_all(text.as_bytes());
            })),
            _ => None,
        };

        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let mut captured = Vec::new();
        let mut truncated = false;
        let mut buf = vec![0u8; READ_CHUNK];
        let kill_at = started + limit;
        let mut killed: Option<Exit> = None;
        let mut exited = pidfd.is_none();
        let mut grace_until: Option<Instant> = None;
        let mut next_tail = Instant::now();
        loop {
            if out_pipe.is_none() && err_pipe.is_none() && exited {
                break;
            }
            let now = Instant::now();
            if killed.is_none() {
                if self.cancel.is_cancelled() {
                    killed = Some(Exit::Cancelled);
                    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                } else if now >= kill_at {
                    killed = Some(Exit::TimedOut);
                    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                }
            }
            if grace_until.is_some_and(|g| now >= g) {
                break;
            }
            let wait = if killed.is_some() {
                CANCEL_POLL
            } else {
                kill_at.saturating_duration_since(now).min(CANCEL_POLL)
            };
            let timeout = Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
            let mut which: Vec<u8> = Vec::with_capacity(3);
            if let Some(p) = &out_pipe {
                fds.push(PollFd::new(p, PollFlags::IN));
                which.push(0);
            }
            if let Some(p) = &err_pipe {
                fds.push(PollFd::new(p, PollFlags::IN));
                which.push(1);
            }
            if let (Some(fd), false) = (&pidfd, exited) {
                fds.push(PollFd::new(fd, PollFlags::IN));
                which.push(2);
            }
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(HostError::Io(format!("waiting for the command: {e}"))),
            }
            let ready: Vec<u8> = fds
                .iter()
                .zip(&which)
                .filter(|(fd, _)| !fd.revents().is_empty())
                .map(|(_, w)| *w)
                .collect();
            drop(fds);
            if !followed.is_empty() && now >= next_tail {
                self.tail(&mut followed, &mut buf);
                next_tail = now + TAIL_EVERY;
            }
            if !exited && now >= next_sample {
                rss.sample();
                next_sample = now + SAMPLE_EVERY;
            }
            if now >= next_observe {
                for o in &mut self.observers {
                    o.flush();
                }
                next_observe = now + OBSERVE_EVERY;
            }
            for w in ready {
                match w {
                    0 | 1 => {
                        let (channel, n) = if w == 0 {
                            (
                                Channel::Stdout,
                                out_pipe.as_mut().map_or(0, |p| read_some(p, &mut buf)),
                            )
                        } else {
                            (
                                Channel::Stderr,
                                err_pipe.as_mut().map_or(0, |p| read_some(p, &mut buf)),
                            )
                        };
                        if n == 0 {
                            if w == 0 {
                                out_pipe = None;
                            } else {
                                err_pipe = None;
                            }
                            continue;
                        }
                        let data = &buf[..n];
                        if channel == Channel::Stdout && capture_stdout > 0 {
                            let room = (capture_stdout as usize).saturating_sub(captured.len());
                            captured.extend_from_slice(&data[..room.min(n)]);
                            truncated |= n > room;
                        }
                        if !quiet {
                            self.write(&log, channel, data);
                        }
                    }
                    _ => {
                        exited = true;
                        // Whatever the command left running in its group goes with it.
                        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                        grace_until = Some(Instant::now() + PIPE_GRACE);
                    }
                }
            }
        }
        self.tail(&mut followed, &mut buf);
        // Reaped here rather than by `child.wait()`, for what the command used.
        let (status, usage) = wait_with_usage(pid)
            .map_err(|e| HostError::Io(format!("waiting for the command: {e}")))?;
        self.usage.add(&rss.finish(&usage));
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        if let Some(f) = feeder {
            let _ = f.join();
        }
        let elapsed = started.elapsed();
        let exit = killed.unwrap_or_else(|| match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(-1),
        });
        let took = human_duration(elapsed);
        let footer = match exit {
            Exit::Code(c) => format!("exit code {c}, elapsed {took}\n"),
            Exit::Signal(s) => format!("killed by signal {s}, elapsed {took}\n"),
            Exit::TimedOut => format!(
                "timed out after {}; its process group was killed\n",
                human_duration(limit)
            ),
            Exit::Cancelled => format!("cancelled after {took}; its process group was killed\n"),
        };
        self.write(&log, Channel::Header, footer.as_bytes());
        for o in &mut self.observers {
            o.flush();
        }
        let stdout = self
            .logs
            .redactor()
            .redact(&String::from_utf8_lossy(&captured))
            .into_owned();
        Ok(CommandResult {
            exit,
            stdout,
            stdout_truncated: truncated,
            elapsed_ms: elapsed.as_millis() as u64,
        })
    }
}

fn read_some(pipe: &mut dyn Read, buf: &mut [u8]) -> usize {
    loop {
        match pipe.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A broken pipe ends the stream like EOF does.
            Err(_) => return 0,
        }
    }
}

/// A logfile followed while a command runs.
struct Followed {
    log: String,
    rel: PathBuf,
    file: Option<std::fs::File>,
}

impl ContextState {
    /// Copies what the followed files gained since last time into their logs. A file that does
    /// not exist yet (or is a symlink, or leaves the workdir) is tried again next time.
    fn tail(&mut self, followed: &mut [Followed], buf: &mut [u8]) {
        for f in followed.iter_mut() {
            if f.file.is_none() {
                f.file = files::open_read(&self.workdir, &f.rel).ok();
            }
            let Some(file) = f.file.as_mut() else {
                continue;
            };
            let mut budget = TAIL_BYTES;
            while budget > 0 {
                let take = budget.min(buf.len());
                let n = read_some(file, &mut buf[..take]);
                if n == 0 {
                    break;
                }
                budget -= n;
                let log = f.log.clone();
                self.write(&log, Channel::Stdout, &buf[..n]);
            }
        }
    }
}

/// Finds the program a command may run: a granted bare name looked up on PATH, a granted
/// absolute path, or the absolute path a granted name resolves to.
pub(crate) fn resolve_program(
    granted: &[String],
    argv0: &str,
    path: &str,
) -> Result<PathBuf, HostError> {
    let listed = if granted.is_empty() {
        "none".to_owned()
    } else {
        granted.join(", ")
    };
    let denied = || {
        HostError::Denied(format!(
            "program {argv0:?} is not granted to this step (granted: {listed}); grant it with --allow-program {argv0} \
             or in the builder's programs"
        ))
    };
    if argv0.contains('/') {
        let p = Path::new(argv0);
        if !p.is_absolute() {
            return Err(HostError::Denied(format!(
                "program {argv0:?} is a relative path; run a granted program by name or by absolute path"
            )));
        }
        if granted.iter().any(|g| g == argv0) {
            return Ok(p.to_path_buf());
        }
        let by_name = granted
            .iter()
            .filter(|g| !g.contains('/'))
            .filter_map(|g| search_path(g, path));
        for found in by_name {
            if found == p {
                return Ok(found);
            }
        }
        return Err(denied());
    }
    if !granted.iter().any(|g| g == argv0) {
        return Err(denied());
    }
    search_path(argv0, path).ok_or_else(|| {
        HostError::NotFound(format!(
            "program {argv0:?} is granted but was not found on PATH ({path})"
        ))
    })
}

fn search_path(name: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Quotes argv for the header line, as a shell would need it.
fn shell_words(argv: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%^".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_must_be_granted() {
        let granted = vec!["sh".to_owned(), "/usr/bin/env".to_owned()];
        let path = "/usr/local/bin:/usr/bin:/bin";
        assert!(
            resolve_program(&granted, "sh", path)
                .unwrap()
                .ends_with("sh")
        );
        assert_eq!(
            resolve_program(&granted, "/usr/bin/env", path).unwrap(),
            Path::new("/usr/bin/env")
        );
        let sh = search_path("sh", path).unwrap();
        assert_eq!(
            resolve_program(&granted, sh.to_str().unwrap(), path).unwrap(),
            sh
        );
        let HostError::Denied(m) = resolve_program(&granted, "rm", path).unwrap_err() else {
            panic!()
        };
        assert_eq!(
            m,
            "program \"rm\" is not granted to this step (granted: sh, /usr/bin/env); grant it with --allow-program rm or in the builder's programs"
        );
        assert!(matches!(
            resolve_program(&granted, "./sh", path),
            Err(HostError::Denied(_))
        ));
        assert!(matches!(
            resolve_program(&["nonesuch".into()], "nonesuch", path),
            Err(HostError::NotFound(_))
        ));
    }

    #[test]
    fn header_quotes_what_needs_quoting() {
        let argv = ["echo", "a b", "it's", "plain-1.0", ""].map(String::from);
        assert_eq!(shell_words(&argv), r"echo 'a b' 'it'\''s' plain-1.0 ''");
    }
}
