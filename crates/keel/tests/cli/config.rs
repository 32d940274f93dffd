//! `keel config check` and `keel config show`.

use crate::support::run;

#[test]
fn check_lists_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[server]\nlisten = \"not-an-address\"\nmax_body_byts = 5\n[database]\nmax_connections = 0\n[telemetry]\nlog_format = \"xml\"\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["config", "check", "--config", "bad.toml"],
        &[("KEEL_SERVER__DRAIN_TIMEOUT", "soon")],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for expect in [
        "server.listen (from bad.toml)",
        "server.max_body_byts (from bad.toml): unknown key; did you mean `server.max_body_bytes`?",
        "telemetry.log_format (from bad.toml)",
        "server.drain_timeout (from env KEEL_SERVER__DRAIN_TIMEOUT)",
        "database.max_connections (from bad.toml): must be between 1 and 10000",
    ] {
        assert!(text.contains(expect), "missing {expect:?} in:\n{text}");
    }

    let out = run(
        dir.path(),
        &["config", "check"],
        &[("KEEL_TELEMETRY__LOG_LEVEL", "keel=loud")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("telemetry.log_level"));

    let out = run(dir.path(), &["config", "check"], &[]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config OK");

    let out = run(
        dir.path(),
        &["config", "check", "--config", "missing.toml"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file missing.toml"));
}

#[test]
fn show_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        "[server]\nmax_body_bytes = 2048\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["config", "show", "--data-dir", "/srv/keel"],
        &[
            (
                "KEEL_DATABASE_URL",
                "postgres://keel:s3cret-pw@db:5432/keel",
            ),
            ("KEEL_SERVER__LISTEN", "0.0.0.0:9000"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("s3cret-pw"), "{text}");
    for expect in [
        "url = \"postgres://keel:[redacted]@db:5432/keel\"",
        "listen = \"0.0.0.0:9000\"",
        "max_body_bytes = 2048",
        "data_dir = \"/srv/keel\"",
        "sqlite_synchronous = \"full\"",
    ] {
        assert!(text.contains(expect), "missing {expect:?} in:\n{text}");
    }
}
