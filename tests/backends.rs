//! Every backend compiled in against the cpu backend, through `distillery bench backend` (the
//! check the GPU bundle runs): the logits of one forward pass from the same weights, then one
//! training step (losses and every weight), on the tiny config. The procedure and its
//! tolerances are documented in `distillery-train`'s `backend_check`.

mod common;

use common::{Workspace, repo_path};
use distillery_train::{LOGIT_TOLERANCE, LOSS_TOLERANCE, WEIGHT_TOLERANCE};

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_cpu() {
    assert_backend_matches_cpu("wgpu");
}

/// Run by `scripts/check-tch.sh`, which builds with `--features tch`.
#[cfg(feature = "tch")]
#[test]
fn tch_cpu_matches_cpu() {
    assert_backend_matches_cpu("tch-cpu");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_backend_left_out_of_the_build_is_refused_before_anything_is_written() {
    let workspace = Workspace::new();
    let (code, message) =
        workspace.run_err(&workspace.train_args("no-cuda", &["run.backend=cuda"]));
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains("run.backend = \"cuda\"") && message.contains("--features cuda"),
        "{message}"
    );
    assert!(!workspace.checkpoints.join("no-cuda").exists());
}

#[test]
fn devices_lists_every_backend_with_its_devices_or_why_it_has_none() {
    let workspace = Workspace::new();
    let listing: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&["devices".into(), "--json".into()])).unwrap();
    let backends = listing.as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|backend| backend["backend"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu", "wgpu", "tch-cpu", "tch-cuda", "cuda"]);
    let devices = |index: usize| backends[index]["devices"].as_array().unwrap().len();
    assert_eq!(devices(0), 1, "{listing}");
    assert!(backends[0]["unavailable"].is_null(), "{listing}");
    if cfg!(feature = "wgpu") {
        // CI installs Mesa's lavapipe, a Vulkan adapter on the CPU.
        assert!(devices(1) >= 1, "{listing}");
    }
    if !cfg!(feature = "cuda") {
        let reason = backends[4]["unavailable"].as_str().unwrap();
        assert!(reason.contains("--features cuda"), "{listing}");
        assert_eq!(devices(4), 0, "{listing}");
    }
}

#[test]
fn the_backend_check_refuses_what_its_tolerances_do_not_cover() {
    let workspace = Workspace::new();
    let (code, message) = workspace.run_err(&check_args(&workspace, "cpu"));
    // A config error.
    assert_eq!(code, 2, "{message}");
    assert!(
        message.contains("run.backend") && message.contains("another one"),
        "{message}"
    );
    let mut half_precision = check_args(&workspace, "wgpu");
    half_precision.extend(["--set".into(), "run.dtype=\"bf16\"".into()]);
    let (code, message) = workspace.run_err(&half_precision);
    assert_eq!(code, 2, "{message}");
    assert!(message.contains("run.dtype"), "{message}");
}

fn check_args(workspace: &Workspace, backend: &str) -> Vec<String> {
    let mut args = vec![
        "bench".to_string(),
        "backend".to_string(),
        repo_path("configs/tiny-test.toml"),
        "--json".to_string(),
        "--set".to_string(),
        format!("run.backend=\"{backend}\""),
    ];
    args.extend(workspace.common_settings("backend-check"));
    args
}

fn assert_backend_matches_cpu(backend: &str) {
    let workspace = Workspace::new();
    let check: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&check_args(&workspace, backend))).unwrap();
    assert_eq!(check["backend"], backend, "{check}");
    assert!(
        check["device"].as_str().unwrap().starts_with(backend),
        "the check does not say it ran on {backend}: {check}"
    );
    let number = |path: &[&str]| {
        path.iter()
            .fold(&check, |value, key| &value[key])
            .as_f64()
            .unwrap_or_else(|| panic!("{path:?} is not a number: {check}"))
    };
    assert!(number(&["logit_difference"]) <= LOGIT_TOLERANCE, "{check}");
    assert!(
        number(&["weight_difference"]) <= WEIGHT_TOLERANCE,
        "{check}"
    );
    for loss in ["train_loss", "validation_loss"] {
        let (cpu, other) = (number(&[loss, "cpu"]), number(&[loss, "backend"]));
        // A 2,048-token vocabulary starts near ln 2048 = 7.6.
        assert!((6.0..9.0).contains(&cpu), "{loss} {check}");
        assert!((cpu - other).abs() <= LOSS_TOLERANCE, "{loss} {check}");
    }
    assert_eq!(check["failures"], serde_json::json!([]), "{check}");
    eprintln!("{check}");
}
