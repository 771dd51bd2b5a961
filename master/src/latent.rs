//! Latent workers: `kiln-worker` processes the master starts on demand (a build waits that only
//! they could run) and stops when they have been idle (`[workers.latent]`, kind `local`). At
//! most one start and one stop of an instance is in flight: an instance is stopped, starting,
//! running or stopping, and moves on only when the last move is done.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::server::Master;
use kiln_config::{Config, Latent, Worker, WorkerAuth};
use kiln_db as db;

/// How long a started instance may take to connect before it is stopped and started again.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where an instance is.
enum Instance {
    /// A child process that has not connected yet.
    Starting { child: Child, since: Instant },
    /// Connected; idle since the last time it had no build.
    Running {
        child: Child,
        idle_since: Option<Instant>,
    },
    /// Asked to stop (SIGTERM: it finishes what it runs, then exits).
    Stopping { child: Child },
}

/// The master's latent workers.
#[derive(Default)]
pub struct LatentWorkers {
    instances: Mutex<HashMap<String, Instance>>,
}

impl std::fmt::Debug for LatentWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatentWorkers").finish_non_exhaustive()
    }
}

/// Starts a latent worker's process (start_instance).
fn start_instance(
    w: &Worker,
    latent: &Latent,
    master_url: &str,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<Child> {
    let WorkerAuth::Token(token) = &w.auth else {
        anyhow::bail!("latent worker {} has no token to start it with", w.name);
    };
    let program = match &latent.program {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding the running kiln")?
            .with_file_name("kiln-worker"),
    };
    std::fs::create_dir_all(&latent.workdir)
        .with_context(|| format!("creating {}", latent.workdir.display()))?;
    let mut cmd = Command::new(&program);
    cmd.arg("--master")
        .arg(master_url)
        .arg("--name")
        .arg(&w.name)
        .arg("--workdir")
        .arg(&latent.workdir)
        .arg("--max-builds")
        .arg(w.max_builds.to_string())
        // A master killed outright (no chance to stop its children) takes them along.
        .arg("--exit-with-parent")
        .env("KILN_TOKEN", token.expose())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if w.sandbox {
        cmd.arg("--sandbox");
    }
    if let Some(ca) = ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
    for t in &w.tags {
        cmd.arg("--tag").arg(t);
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Asks an instance to stop (stop_instance): SIGTERM, so it drains.
fn stop_instance(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, whose pid is still ours (not yet reaped).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
}

impl Master {
    /// Starts latent workers builds wait for, and stops those idle for their timeout. Called
    /// every heartbeat and after dispatch passes.
    pub async fn manage_latent(&self) -> anyhow::Result<()> {
        let state = self.state();
        let config: &Config = &state.config;
        if !config.workers.iter().any(|w| w.latent.is_some()) {
            return Ok(());
        }
        // Over TLS, the URL the certificate names (a certificate for the listen address
        // is rare); the certificate file itself is trusted, so a self-made one does.
        let tls = config.master.tls.as_ref();
        let Some(url) = self.address().map(|a| match tls {
            Some(_) => config.master.url.trim_end_matches('/').to_owned(),
            None => format!("http://{a}"),
        }) else {
            return Ok(());
        };
        let ca_cert = tls.map(|t| t.cert.as_path());
        let waiting: Vec<String> = {
            let mut conn = self.db.pool().acquire().await?;
            db::queue_heads(&mut conn)
                .await?
                .into_iter()
                .map(|(builder, _)| builder)
                .collect()
        };
        let connected = self.workers.connected();
        let busy: Vec<String> = self.workers.leases().into_iter().map(|(_, w)| w).collect();
        let mut instances = self
            .latent
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for w in &config.workers {
            let Some(latent) = &w.latent else { continue };
            let wanted = waiting
                .iter()
                .any(|b| config.builder(b).is_some_and(|builder| builder.accepts(w)));
            let is_connected = connected.contains(&w.name);
            let has_builds = busy.contains(&w.name);
            let now = Instant::now();
            let next = match instances.remove(&w.name) {
                None if wanted => match start_instance(w, latent, &url, ca_cert) {
                    Ok(child) => {
                        tracing::info!(worker = %w.name, "started a latent worker");
                        Some(Instance::Starting { child, since: now })
                    }
                    Err(error) => {
                        tracing::error!(worker = %w.name, error = format!("{error:#}"), "cannot start a latent worker");
                        None
                    }
                },
                None => None,
                Some(Instance::Starting { mut child, since }) => {
                    if child.try_wait()?.is_some() {
                        tracing::warn!(worker = %w.name, "a latent worker exited before connecting");
                        None
                    } else if is_connected {
                        Some(Instance::Running {
                            child,
                            idle_since: None,
                        })
                    } else if now - since > START_TIMEOUT {
                        tracing::warn!(worker = %w.name, "a latent worker did not connect in time; stopping it");
                        stop_instance(&child);
                        Some(Instance::Stopping { child })
                    } else {
                        Some(Instance::Starting { child, since })
                    }
                }
                Some(Instance::Running {
                    mut child,
                    idle_since,
                }) => {
                    if child.try_wait()?.is_some() {
                        tracing::warn!(worker = %w.name, "a latent worker exited");
                        None
                    } else if has_builds || wanted {
                        Some(Instance::Running {
                            child,
                            idle_since: None,
                        })
                    } else {
                        let since = idle_since.unwrap_or(now);
                        if now - since >= latent.idle_timeout {
                            tracing::info!(worker = %w.name, idle_s = (now - since).as_secs(), "stopping an idle latent worker");
                            stop_instance(&child);
                            Some(Instance::Stopping { child })
                        } else {
                            Some(Instance::Running {
                                child,
                                idle_since: Some(since),
                            })
                        }
                    }
                }
                Some(Instance::Stopping { mut child }) => {
                    if child.try_wait()?.is_some() {
                        tracing::info!(worker = %w.name, "a latent worker stopped");
                        None
                    } else {
                        Some(Instance::Stopping { child })
                    }
                }
            };
            if let Some(i) = next {
                instances.insert(w.name.clone(), i);
            }
        }
        Ok(())
    }

    /// The latent workers' states, by name: `starting`, `running`, `stopping`.
    pub fn latent_states(&self) -> Vec<(String, &'static str)> {
        let instances = self
            .latent
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, &'static str)> = instances
            .iter()
            .map(|(n, i)| {
                (
                    n.clone(),
                    match i {
                        Instance::Starting { .. } => "starting",
                        Instance::Running { .. } => "running",
                        Instance::Stopping { .. } => "stopping",
                    },
                )
            })
            .collect();
        out.sort();
        out
    }
}
