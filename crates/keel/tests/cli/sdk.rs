//! The official `openai` Python SDK, unchanged, against a real `keel serve` routing to a
//! real `keel mock-llm`. `scripts/test` makes the venv and sets KEEL_TEST_PYTHON.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::support::{Keel, create_key, keel_command};

#[tokio::test]
async fn the_openai_python_sdk_works_unchanged() {
    let python = std::env::var("KEEL_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("KEEL_TEST_PYTHON is not set: run the suite with ./scripts/test, which makes the SDK venv")
    });
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dir = tempfile::tempdir().unwrap();

    let mut cmd: tokio::process::Command = keel_command(dir.path()).into();
    cmd.args([
        "mock-llm",
        "--port",
        "0",
        "--script",
        &format!("{root}/tests/sdk/script.json"),
    ])
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .kill_on_drop(true);
    let mut mock = cmd.spawn().unwrap();
    let mut lines = BufReader::new(mock.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mock_url = line.rsplit(' ').next().unwrap().to_owned();

    std::fs::write(
        dir.path().join("keel.toml"),
        format!(
            "[models.default]\n[models.default.retry]\nmax_attempts = 1\n\
             [[models.default.targets]]\nprovider = \"openai\"\nmodel = \"scripted\"\nbase_url = \"{mock_url}\"\n"
        ),
    )
    .unwrap();
    let key = create_key(dir.path(), "sdk", "member", &[]);
    let keel = Keel::start(dir.path(), &[]).await;

    let out = tokio::process::Command::new(&python)
        .arg(format!("{root}/tests/sdk/openai_sdk_check.py"))
        .env("KEEL_BASE_URL", keel.url("/v1"))
        .env("KEEL_API_KEY", &key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK check failed:\n{stdout}\n{}\nkeel output:\n{}",
        String::from_utf8_lossy(&out.stderr),
        keel.output()
    );
    assert!(stdout.contains("16 passed, 0 failed"), "{stdout}");
}
