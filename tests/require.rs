//! The rules of explicit skips (`tests/common/require.rs`), which every test that needs a tool
//! from outside Cargo goes through.

mod common;

use common::require::{SKIP_NAMES, Tool, skip_covers};

#[test]
fn a_skip_covers_only_the_names_it_lists() {
    assert_eq!(skip_covers("", "redis"), Ok(false));
    assert_eq!(skip_covers("redis", "redis"), Ok(true));
    assert_eq!(skip_covers("browser,redis", "redis"), Ok(true));
    assert_eq!(skip_covers("browser, redis", "redis"), Ok(true));
    assert_eq!(skip_covers("browser redis", "podman"), Ok(false));
    assert_eq!(skip_covers(" , ", "podman"), Ok(false));
}

#[test]
fn all_covers_every_name() {
    for (name, _) in SKIP_NAMES {
        assert_eq!(skip_covers("all", name), Ok(true), "{name}");
    }
}

#[test]
fn an_unknown_name_is_an_error_that_lists_the_known_ones() {
    let err = skip_covers("redis,chromium", "redis").expect_err("chromium is not a skip name");
    assert!(err.contains("\"chromium\""), "{err}");
    for (name, _) in SKIP_NAMES {
        assert!(err.contains(name), "{err} does not list {name}");
    }
}

#[test]
fn every_tool_has_a_known_skip_name_and_an_install_command() {
    let tools = [
        Tool::Chromium,
        Tool::Node,
        Tool::NpmPackage {
            dir: "tests/browser",
            package: "playwright-core",
        },
        Tool::RedisServer,
        Tool::MuslTarget,
        Tool::PythonModule {
            venv: "tests/python/.venv",
            module: "websockets",
            requirements: "tests/python/requirements.txt",
        },
    ];
    for tool in &tools {
        assert!(
            SKIP_NAMES.iter().any(|(n, _)| *n == tool.skip_name()),
            "{}",
            tool.what()
        );
        let install = tool.install();
        assert!(
            install.starts_with("apt-get install -y ")
                || install.starts_with("npm ci --prefix ")
                || install.starts_with("rustup target add ")
                || install.starts_with("python3 -m venv "),
            "{install}"
        );
    }
}
