//! The README and the packaged files tell a newcomer the truth (issue 19,
//! section 7): the quick start runs as written from a fresh clone, the README
//! is for users (the lab report lives in `bench/README.md`), one default config
//! file per role, a packaged config that names the unit's state directory, and
//! one documented default for `client.metrics_listen`.

mod common;

use std::process::{Command, Output};

use common::*;

/// The text of `## title` up to the next `## ` heading.
fn section<'a>(text: &'a str, title: &str) -> &'a str {
    let start = text.find(&format!("\n## {title}\n")).unwrap_or_else(|| panic!("no section `## {title}`"));
    let body = &text[start + 1..];
    let end = body[3..].find("\n## ").map(|i| i + 4).unwrap_or(body.len());
    &body[..end]
}

/// The lines of the ```sh blocks of `text`, comments and prompts left as written.
fn shell_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("```") {
            inside = !inside && line.trim() == "```sh";
            continue;
        }
        if inside {
            lines.push(line);
        }
    }
    lines
}

/// A shell line without its trailing `# comment`.
fn command_of(line: &str) -> &str {
    line.split(" #").next().unwrap_or_default().trim()
}

/// A command line split as a shell would: words, with '…' and "…" quoting.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN).args(args).envs(envs.iter().copied()).output().expect("run tunneld")
}

#[test]
fn the_quick_start_runs_as_written_from_a_fresh_clone() {
    let readme = read_repo_file("README.md");
    let quick = section(&readme, "Quick start");
    let lines = shell_lines(quick);
    // `tunneld` is a command only once the quick start has put it on PATH.
    let installed = lines.iter().position(|l| command_of(l).starts_with("cargo install") && l.contains("--path ."));
    let first_tunneld = lines.iter().position(|l| command_of(l).starts_with("tunneld "));
    assert!(
        matches!((installed, first_tunneld), (Some(i), Some(t)) if i < t),
        "the quick start must install tunneld (cargo install --path .) before it runs `tunneld`:\n{quick}"
    );
    assert!(!quick.contains("cargo test") && !quick.contains(".ci/run"), "running the tests is not a step of the quick start");
    assert!(!quick.contains("cargo run"), "one way to run the project in the quick start: the installed `tunneld`");

    // Its ctl commands work against a real server, as typed (ports made free).
    let server = Daemon::server("s3cret", &[]);
    let listen = server.http.to_string();
    // `ctl top` needs a terminal (tests/operator_ctl.rs drives it in tmux).
    let ctl_lines: Vec<&str> =
        lines.iter().map(|l| command_of(l)).filter(|c| c.starts_with("tunneld ctl ") && !c.starts_with("tunneld ctl top")).collect();
    assert!(ctl_lines.len() >= 3, "the quick start uses ctl for mappings and clients:\n{quick}");
    let ports: Vec<(String, String)> = ["2222", "2223", "2224"].iter().map(|p| (p.to_string(), free_port().to_string())).collect();
    for line in ctl_lines {
        let mut typed = line.to_string();
        for (readme_port, free) in &ports {
            typed = typed.replace(readme_port, free);
        }
        let words = shell_words(&typed);
        let args: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
        let out = run(&args, &[("TUNNELD_API__LISTEN", &listen)]);
        assert!(out.status.success(), "`{line}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    let tests = section(&readme, "Tests");
    assert!(shell_lines(tests).iter().any(|l| command_of(l) == "cargo test"), "{tests}");
    let layout = section(&readme, "Layout");
    assert!(layout.contains("src/cli/"), "{layout}");
}

#[test]
fn the_readme_is_for_users_and_the_lab_report_is_in_bench() {
    let readme = read_repo_file("README.md");
    let bench = read_repo_file("bench/README.md");
    for lab_row in ["| throughput, 1 stream (Gbit/s) |", "| run (`bench/results/", "| server, per idle client session (KiB)"] {
        assert!(!readme.contains(lab_row), "README still carries the lab report ({lab_row})");
        assert!(bench.contains(lab_row), "bench/README.md lacks the lab report's {lab_row}");
    }
    let performance = section(&readme, "Performance");
    assert!(performance.contains("bench/README.md"), "{performance}");
    assert!(performance.lines().count() < 30, "a summary, not the report:\n{performance}");
    assert!(readme.lines().count() < 700, "README.md has {} lines", readme.lines().count());
}

#[test]
fn one_default_config_file_per_role() {
    for (args, file) in [
        (&["server", "--help"][..], "/etc/tunneld/server.toml"),
        (&["fingerprint", "--help"][..], "/etc/tunneld/server.toml"),
        (&["ctl", "--help"][..], "/etc/tunneld/server.toml"),
        (&["client", "--help"][..], "/etc/tunneld/client.toml"),
    ] {
        let out = run(args, &[]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(file), "`tunneld {}` does not name {file}:\n{help}", args.join(" "));
    }
}

#[test]
fn the_packaged_config_names_the_units_state_directory() {
    let unit = read_repo_file("dist/tunneld-server.service");
    let state_directory = unit.lines().find_map(|l| l.strip_prefix("StateDirectory=")).expect("the server unit keeps StateDirectory=");
    let expected = format!("/var/lib/{state_directory}");
    // What the shell sees, without the unit's $STATE_DIRECTORY.
    let config = repo_path("dist/server.toml").display().to_string();
    let out = Command::new(BIN)
        .args(["check-config", "--config", &config, "server"])
        .env_remove("STATE_DIRECTORY")
        .env_remove("TUNNELD_SERVER__STATE_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("state_dir = \"{expected}\"")), "{shown}");
    let fingerprint = Command::new(BIN)
        .args(["fingerprint", "--config", &config])
        .env_remove("STATE_DIRECTORY")
        .env_remove("TUNNELD_SERVER__STATE_DIR")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&fingerprint.stderr);
    assert!(fingerprint.status.success() || said.contains(&format!("{expected}/tls-cert.pem")), "{said}");
}

#[test]
fn client_metrics_listen_has_one_documented_default() {
    // The code's default: no key, no metrics listener.
    let (_dir, config) = config_file("[client]\nserver = \"h:9000\"\nsecret = \"s\"\ntls = false\n");
    let out = run(&["check-config", "--config", &config, "client"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("metrics_listen"), "the default is off");
    for doc in ["README.md", "docs/operations.md", "dist/client.toml"] {
        // Paragraphs, not lines: a sentence may wrap between the key and its default.
        let text = read_repo_file(doc);
        for paragraph in text.split("\n\n").filter(|p| p.contains("metrics_listen") && p.contains("default")) {
            let flat = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(!flat.contains("default `127.0.0.1:9101`"), "{doc} calls the packaged value the default: {flat}");
        }
    }
}
