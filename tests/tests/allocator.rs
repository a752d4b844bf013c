//! `sdctl up` starts the model services with tcmalloc where it is installed
//! (`make setup` installs it), the gateway with glibc's malloc, and
//! `--allocator glibc` keeps glibc's everywhere.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::procfs::{children, cmdline, mapped_library};
use common::stack::Stack;

const TCMALLOC: &str = "libtcmalloc";

fn installed() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ]
    .iter()
    .any(|d| {
        std::path::Path::new(d)
            .join("libtcmalloc_minimal.so.4")
            .is_file()
    })
}

/// (model services, gateway) among sdctl's children, once all four run.
fn processes(stack: &Stack) -> (Vec<u32>, u32) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let kids = children(stack.pid());
        let gateway = kids
            .iter()
            .copied()
            .find(|&k| cmdline(k).contains("sd-gateway"));
        let models: Vec<u32> = kids
            .iter()
            .copied()
            .filter(|&k| Some(k) != gateway)
            .collect();
        if let (Some(g), 3) = (gateway, models.len()) {
            return (models, g);
        }
        assert!(Instant::now() < until, "sdctl's children: {kids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn model_services_get_tcmalloc_where_installed_and_glibc_when_asked() {
    let model = common::model("sd1-tiny");
    let stack = Stack::start(&model);
    let (models, gateway) = processes(&stack);
    for &pid in &models {
        assert_eq!(
            mapped_library(pid, TCMALLOC).is_some(),
            installed(),
            "{}: tcmalloc mapped exactly where installed",
            cmdline(pid)
        );
    }
    assert_eq!(
        mapped_library(gateway, TCMALLOC),
        None,
        "the gateway keeps glibc's"
    );
    drop(stack);

    let stack = Stack::start_with(&model, &["--allocator", "glibc"]);
    let (models, _) = processes(&stack);
    for &pid in &models {
        assert_eq!(mapped_library(pid, TCMALLOC), None, "{}", cmdline(pid));
    }
}
