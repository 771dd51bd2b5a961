//! Files, programs and confinement: what a step can and cannot reach.

use std::sync::Arc;

use runtime::{Channel, Confinement, Outcome};
use serde_json::json;

use crate::harness::{Farm, helper};

#[test]
fn reading_the_parent_directory_is_refused() {
    let farm = Farm::new();
    std::fs::write(
        farm.workdir
            .path()
            .parent()
            .unwrap()
            .join("kiln-outside.txt"),
        "outside",
    )
    .ok();
    let (out, _) = farm.run(json!({"action": "read", "path": "../kiln-outside.txt"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some("read ../kiln-outside.txt: Operation not permitted (os error 63)")
    );
}

#[test]
fn absolute_paths_outside_are_refused() {
    let farm = Farm::new();
    let (out, _) = farm.run(json!({"action": "read", "path": "/etc/passwd"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some("read /etc/passwd: No such file or directory (os error 44)")
    );
}

#[test]
fn symlinks_out_of_the_workdir_are_not_followed() {
    let farm = Farm::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "top secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), farm.path("link")).unwrap();
    let (out, rec) = farm.run(json!({"action": "read", "path": "link"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some("read link: Operation not permitted (os error 63)")
    );
    assert!(!rec.all("stdio").contains("top secret"));
}

#[test]
fn read_only_directories_can_be_read_but_not_written() {
    let mut farm = Farm::new();
    let toolchain = tempfile::tempdir().unwrap();
    std::fs::write(toolchain.path().join("version"), "1.2.3").unwrap();
    farm.grant.ro_dirs.push(toolchain.path().to_path_buf());
    let version = toolchain.path().join("version").display().to_string();
    let (out, rec) = farm.run(json!({"action": "read", "path": version}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(rec.text("stdio", Channel::Stdout), "1.2.3\n");

    let target = toolchain.path().join("new").display().to_string();
    let (out, _) = farm.run(json!({"action": "write", "path": target, "content": "x"}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some(&*format!(
            "write {target}: Operation not permitted (os error 63)"
        ))
    );
    assert!(!toolchain.path().join("new").exists());
}

#[test]
fn the_workdir_is_read_write() {
    let farm = Farm::new();
    let (out, _) = farm.run(json!({"action": "write", "path": "made.txt", "content": "hello"}));
    assert_eq!(out.result, Outcome::Success);
    assert_eq!(
        std::fs::read_to_string(farm.path("made.txt")).unwrap(),
        "hello"
    );
    // `..` is fine as long as the path never leaves the workdir.
    std::fs::create_dir(farm.path("sub")).unwrap();
    let (out, _) = farm.run(json!({"action": "write", "path": "sub/../again.txt", "content": "x"}));
    assert_eq!(out.result, Outcome::Success, "{:?}", out.message);
    assert!(farm.path("again.txt").is_file());
}

#[test]
fn ungranted_programs_are_refused() {
    let mut farm = Farm::new();
    farm.allow(&["echo"]);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["rm", "-rf", "."]}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some(
            "denied: program \"rm\" is not granted to this step (granted: echo); grant it with --allow-program rm \
             or in the builder's programs"
        )
    );
    assert_eq!(
        rec.all("stdio"),
        format!("step failed: {}\n", out.message.unwrap())
    );
}

#[test]
fn loader_variables_are_refused() {
    let mut farm = Farm::new();
    farm.allow(&["true"]);
    let (out, _) =
        farm.run(json!({"action": "run", "argv": ["true"], "env": [["LD_PRELOAD", "./evil.so"]]}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some(
            "denied: environment variable LD_PRELOAD would let the step load code into a granted program; loader variables are not allowed"
        )
    );
}

#[test]
fn commands_get_the_constructed_environment_only() {
    let mut farm = Farm::new();
    farm.allow(&["env"]);
    farm.grant.env.insert("CC".into(), "clang".into());
    // SAFETY: set before any command of this test runs; tests only read their own variables.
    unsafe { std::env::set_var("KILN_TEST_HOST_ONLY", "leaked") };
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["env"], "env": [["EXTRA", "1"]]}));
    assert_eq!(out.result, Outcome::Success);
    let mut vars: Vec<String> = rec
        .text("stdio", Channel::Stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    vars.sort();
    let home = farm.workdir.path().display();
    assert_eq!(
        vars,
        [
            "CC=clang".to_owned(),
            "EXTRA=1".into(),
            format!("HOME={home}"),
            "PATH=/usr/local/bin:/usr/bin:/bin".into()
        ]
    );
}

#[test]
fn the_guest_sees_only_granted_environment_variables() {
    let mut farm = Farm::new();
    farm.grant.env.insert("CC".into(), "clang".into());
    let (out, _) = farm.run(json!({"action": "env", "name": "CC"}));
    assert_eq!(out.summary.as_deref(), Some("CC=clang"));
    let (out, _) = farm.run(json!({"action": "env", "name": "PATH"}));
    assert_eq!(out.summary.as_deref(), Some("PATH=unset"));
}

#[test]
fn command_output_streams_with_header_and_exit_status() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    let (out, rec) =
        farm.run(json!({"action": "run", "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(out.summary.as_deref(), Some("exit code 3"));
    assert_eq!(rec.text("stdio", Channel::Stdout), "out\n");
    assert_eq!(rec.text("stdio", Channel::Stderr), "err\n");
    let header = rec.text("stdio", Channel::Header);
    assert!(
        header.starts_with("$ sh -c 'echo out; echo err >&2; exit 3'\nexit code 3, elapsed "),
        "{header}"
    );
}

#[test]
fn commands_run_in_a_subdirectory_and_read_stdin() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    std::fs::create_dir(farm.path("src")).unwrap();
    let (out, rec) =
        farm.run(json!({"action": "run", "argv": ["sh", "-c", "pwd; cat"], "cwd": "src", "stdin": "fed\n", "capture": 4096}));
    assert_eq!(out.result, Outcome::Success, "{:?}", out.message);
    let expected = format!("{}\nfed\n", farm.path("src").display());
    assert_eq!(rec.text("stdio", Channel::Stdout), expected);
    assert_eq!(out.properties["captured"], json!(expected));

    std::os::unix::fs::symlink("/tmp", farm.path("tmplink")).unwrap();
    let (out, _) =
        farm.run(json!({"action": "run", "argv": ["sh", "-c", "pwd"], "cwd": "tmplink"}));
    assert_eq!(
        out.message.as_deref(),
        Some(
            "not found: working directory: tmplink is or passes through a symlink, which Kiln never follows"
        )
    );
    let (out, _) = farm.run(json!({"action": "run", "argv": ["sh", "-c", "pwd"], "cwd": "../"}));
    assert_eq!(
        out.message.as_deref(),
        Some("invalid: path \"../\" leaves the workdir (`..`)")
    );
}

#[test]
fn a_command_timeout_kills_the_whole_process_group() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    let script = "sleep 30 & echo $! > bg.pid; sleep 30";
    let (out, rec) =
        farm.run(json!({"action": "run", "argv": ["sh", "-c", script], "timeout_ms": 300}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(out.summary.as_deref(), Some("timed out"));
    assert!(out.elapsed.as_secs() < 10, "{:?}", out.elapsed);
    assert!(
        rec.text("stdio", Channel::Header)
            .contains("timed out after 300 ms; its process group was killed\n")
    );
    let bg: i32 = std::fs::read_to_string(farm.path("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background sleep was in the command's process group, so it was killed too.
    assert_dies(bg);
}

#[test]
fn processes_left_behind_by_a_finished_command_are_killed() {
    let mut farm = Farm::new();
    farm.allow(&["sh"]);
    let (out, _) = farm.run(json!({"action": "run", "argv": ["sh", "-c", "sleep 30 > /dev/null 2>&1 & echo $! > bg.pid"]}));
    assert_eq!(out.result, Outcome::Success);
    assert!(out.elapsed.as_secs() < 10);
    let bg: i32 = std::fs::read_to_string(farm.path("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_dies(bg);
}

/// Waits (boundedly) for a killed process to be gone or a zombie: SIGKILL is delivered at once,
/// but on a loaded machine the exit itself can take a moment.
fn assert_dies(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.is_empty() || state.contains(") Z ") || state.contains(") X ") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} survived its group's kill: {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn sandbox_farm() -> Farm {
    let mut farm = Farm::new();
    farm.grant.confinement = Some(Arc::new(
        Confinement::probe(helper()).expect("this kernel confines (Landlock ABI 4+)"),
    ));
    farm.allow(&["sh", "cat"]);
    farm
}

#[test]
fn sandbox_commands_write_the_workdir_but_not_outside() {
    let farm = sandbox_farm();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped");
    let script = format!(
        "echo ok > inside.txt && cat /etc/hostname > /dev/null && echo x > {}",
        target.display()
    );
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", script]}));
    assert_eq!(out.result, Outcome::Failure, "{}", rec.all("stdio"));
    assert_eq!(out.summary.as_deref(), Some("exit code 2"));
    assert_eq!(
        std::fs::read_to_string(farm.path("inside.txt")).unwrap(),
        "ok\n"
    );
    assert!(!target.exists());
    assert!(
        rec.text("stdio", Channel::Stderr)
            .contains("Permission denied"),
        "{}",
        rec.all("stdio")
    );
    assert!(
        rec.text("stdio", Channel::Header)
            .contains(" confined (sandbox mode)\n")
    );
}

#[test]
fn sandbox_commands_cannot_read_secrets_or_devices_of_the_worker() {
    let farm = sandbox_farm();
    // Reading (not just stat-ing, which Landlock does not govern) files and listing directories.
    let script = "for f in /etc/shadow /dev/vda /dev/sda; do \
                  if head -c 1 $f >/dev/null 2>&1; then echo \"readable $f\"; fi; done; \
                  for d in /etc/ssh /run /root /home /var; do \
                  if ls $d/ >/dev/null 2>&1; then echo \"listable $d\"; fi; done; \
                  cat /etc/passwd /etc/hostname /usr/bin/env /dev/urandom 2>&1 | head -c 1 >/dev/null && echo system-ok";
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", script]}));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    assert_eq!(rec.text("stdio", Channel::Stdout), "system-ok\n");
}

#[test]
fn sandbox_commands_have_a_private_tmpdir() {
    let farm = sandbox_farm();
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["sh", "-c", "echo t > \"$TMPDIR/x\" && cat \"$TMPDIR/x\" && echo y > /tmp/kiln-escape-$$"]}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(rec.text("stdio", Channel::Stdout), "t\n");
}

#[test]
fn sandbox_commands_have_no_network() {
    let farm = sandbox_farm();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Seccomp refuses IP sockets with EPERM (1) before Landlock's TCP rule (EACCES) is reached.
    let mut farm = farm;
    farm.allow(&["python3"]);
    let script = format!(
        "import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), timeout=2)\n print('connected')\nexcept OSError as e:\n print('refused', e.errno)\ntry:\n socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n print('udp')\nexcept OSError as e:\n print('udp refused', e.errno)\n"
    );
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["python3", "-c", script]}));
    assert_eq!(out.result, Outcome::Success, "{}", rec.all("stdio"));
    assert_eq!(
        rec.text("stdio", Channel::Stdout),
        "refused 1\nudp refused 1\n"
    );

    // Nor UNIX sockets outside: a named socket needs no read access to be connected to.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.sock");
    let _daemon = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let unix = format!(
        "import socket\ntry:\n socket.socket(socket.AF_UNIX).connect('{}')\n print('connected')\nexcept OSError as e:\n print('refused', e.errno)\na, b = socket.socketpair()\na.send(b'x')\nprint('socketpair', b.recv(1))\n",
        path.display()
    );
    let (_, rec) = farm.run(json!({"action": "run", "argv": ["python3", "-c", unix]}));
    assert_eq!(
        rec.text("stdio", Channel::Stdout),
        "refused 1\nsocketpair b'x'\n",
        "{}",
        rec.all("stdio")
    );

    // The same program unconfined connects: the refusal above is the sandbox's doing.
    let mut plain = Farm::new();
    plain.allow(&["python3"]);
    let (_, rec) = plain.run(json!({"action": "run", "argv": ["python3", "-c", script]}));
    assert_eq!(rec.text("stdio", Channel::Stdout), "connected\nudp\n");
}

#[test]
fn the_guest_has_no_network() {
    let farm = Farm::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (out, _) = farm.run(json!({"action": "connect", "addr": addr}));
    assert_eq!(out.result, Outcome::Failure);
    assert_eq!(
        out.message.as_deref(),
        Some(&*format!("connect {addr}: Permission denied (os error 2)"))
    );
}

#[test]
fn sandbox_mode_refuses_to_start_without_its_helper() {
    let err =
        Confinement::probe(runtime::Helper::dedicated("/nonexistent/kiln-confine")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the confinement helper /nonexistent/kiln-confine cannot be run: No such file or directory (os error 2)"
    );
    // This kernel enforces Landlock; what sandbox mode needs, and what it reports, is at least ABI 4.
    assert!(runtime::confine::landlock_abi() >= runtime::confine::MIN_LANDLOCK_ABI);
}

#[test]
fn sandbox_denies_dangerous_system_calls() {
    let mut farm = sandbox_farm();
    farm.allow(&["unshare"]);
    let (out, rec) = farm.run(json!({"action": "run", "argv": ["unshare", "--user", "true"]}));
    assert_eq!(out.result, Outcome::Failure);
    assert!(
        rec.text("stdio", Channel::Stderr)
            .contains("Operation not permitted"),
        "{}",
        rec.all("stdio")
    );
}
