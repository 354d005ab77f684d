//! `ivshm policy check`: what a VM's policy says about a region name, offline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ivshm_policy::GuestShmStatus;
use ivshm_server::named::{guest_name_for, region_socket_name};

/// `ivshm policy ...`: what a VM's `vdev shmem` policy decides, without a server.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the decision for NAME in VM's policy: allow, deny, or illegal (a name no VM may
    /// use, or one that becomes illegal after subst), the host name after subst, the rule that
    /// decided (or why the name is illegal), the v0 socket the VM's directory has for it (when
    /// allowed), and the status a factory create would get (policy only). Exit status 0 for
    /// GSS_OK (allow), 10 + the status code otherwise (14 GSS_ILLEGAL_NAME for illegal, 15
    /// GSS_NO_PERMISSION for deny).
    Check(CheckArgs),
}

/// `ivshm policy check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The server's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The VM (a `[vm.NAME]` table).
    #[arg(long)]
    pub vm: String,
    /// The region name as the guest asks for it.
    pub name: String,
}

/// Exit status for a refused name: 10 + the `GSS_*` code.
pub fn exit_status(status: GuestShmStatus) -> i32 {
    if status.is_ok() {
        0
    } else {
        10 + status.as_u32() as i32
    }
}

/// Runs the command: prints the decision and exits with its status.
pub fn run(c: PolicyCommand) -> anyhow::Result<()> {
    match c {
        PolicyCommand::Check(args) => {
            let (text, status) = check(&args)?;
            print!("{text}");
            // Who cannot reach this VM's directory (stderr: stdout and the exit status stay
            // the policy's answer).
            if let Some(named) = ivshm_server::config_file::load(&args.config)?.named {
                let prefix = format!("VM {}:", args.vm);
                for warning in ivshm_server::access::host_vm_directory_warnings(&named) {
                    if warning.starts_with(&prefix) {
                        eprintln!("warning: {warning}");
                    }
                }
            }
            let code = exit_status(status);
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}

/// The report `ivshm policy check` prints, and the status.
pub fn check(args: &CheckArgs) -> anyhow::Result<(String, GuestShmStatus)> {
    let config = ivshm_server::config_file::load(&args.config)?;
    let named = config.named.context("the configuration has no VMs")?;
    let vm = named
        .vms
        .iter()
        .find(|v| v.name.as_str() == args.vm)
        .with_context(|| {
            let known: Vec<&str> = named.vms.iter().map(|v| v.name.as_str()).collect();
            format!(
                "no VM {:?} in {} (VMs: {})",
                args.vm,
                args.config.display(),
                known.join(", ")
            )
        })?;
    let decision = vm.policy.decide(&args.name);
    let status = decision.status;
    let mut out = String::new();
    let verdict = if status.is_ok() {
        "allow"
    } else if status == GuestShmStatus::NoPermission {
        "deny"
    } else {
        "illegal"
    };
    out.push_str(&format!("vm: {}\n", vm.name));
    out.push_str(&format!("name: {}\n", decision.guest_name));
    out.push_str(&format!("decision: {verdict}\n"));
    match &decision.host_name {
        Some(host) => out.push_str(&format!("host name: {host}\n")),
        None => out.push_str("host name: -\n"),
    }
    match (&decision.rule, &decision.name_error) {
        (_, Some(error)) => out.push_str(&format!("reason: {error}\n")),
        (Some(rule), None) => out.push_str(&format!("rule: {rule}\n")),
        (None, None) => {}
    }
    if status.is_ok() {
        // Where the VM's directory has the region's v0 socket (its name for the region may be
        // another name that maps to the same host name).
        let socket = decision
            .host_name
            .as_ref()
            .and_then(|host| guest_name_for(&vm.policy, host.as_str()))
            .map(|guest| {
                named
                    .root
                    .join(vm.name.as_str())
                    .join(region_socket_name(&guest))
                    .display()
                    .to_string()
            });
        out.push_str(&format!("socket: {}\n", socket.as_deref().unwrap_or("-")));
    }
    out.push_str(&format!("status: {} ({})\n", status, status.as_u32()));
    Ok((out, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tag: &str, body: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "ivshm-policy-check-{tag}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, body).unwrap();
        path
    }

    fn run_check(path: &std::path::Path, vm: &str, name: &str) -> (String, GuestShmStatus) {
        check(&CheckArgs {
            config: path.to_path_buf(),
            vm: vm.into(),
            name: name.into(),
        })
        .unwrap()
    }

    #[test]
    fn reports_decision_host_name_rule_and_status() {
        let path = config(
            "report",
            "root = \"/srv/ivshm\"\n[vm.vm0]\nrules = [\"deny pluto\", \"allow pluto*\"]\n\
             subst = \",guest0\"\n",
        );
        let (text, status) = run_check(&path, "vm0", "plutoplanet");
        assert_eq!(status, GuestShmStatus::Ok);
        assert_eq!(
            text,
            "vm: vm0\nname: plutoplanet\ndecision: allow\nhost name: guest0plutoplanet\n\
             rule: rule 2: allow pluto*\nsocket: /srv/ivshm/vm0/plutoplanet.sock\n\
             status: GSS_OK (0)\n"
        );
        let (text, status) = run_check(&path, "vm0", "pluto");
        assert_eq!(status, GuestShmStatus::NoPermission);
        assert!(text.contains("decision: deny\n"), "{text}");
        assert!(text.contains("rule: rule 1: deny pluto\n"), "{text}");
        assert!(text.ends_with("status: GSS_NO_PERMISSION (5)\n"), "{text}");
        let (text, status) = run_check(&path, "vm0", "a/b");
        assert_eq!(status, GuestShmStatus::IllegalName);
        assert!(
            text.contains("decision: illegal\nhost name: -\nreason: guest name:"),
            "{text}"
        );
        assert_eq!(exit_status(GuestShmStatus::Ok), 0);
        assert_eq!(exit_status(GuestShmStatus::IllegalName), 14);
        assert_eq!(exit_status(GuestShmStatus::NoPermission), 15);
        let err = check(&CheckArgs {
            config: path.clone(),
            vm: "nope".into(),
            name: "x".into(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("VMs: vm0"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_factory_sockets_name_is_reported_illegal() {
        let path = config("reserved", "[vm.open]\n");
        let (text, status) = run_check(&path, "open", "factory");
        assert_eq!(status, GuestShmStatus::IllegalName);
        assert_eq!(
            text,
            "vm: open\nname: factory\ndecision: illegal\nhost name: -\n\
             reason: guest name: the name factory is reserved (its socket would be the VM's \
             factory.sock)\n\
             status: GSS_ILLEGAL_NAME (4)\n"
        );
        assert_eq!(run_check(&path, "open", "factory2").1, GuestShmStatus::Ok);
        std::fs::remove_file(path).unwrap();
        // Whatever the rules say: a name check comes before them.
        let path = config(
            "reserved-rules",
            "[vm.closed]
rules = [\"deny *\"]
[vm.listed]
rules = [\"allow mem*\"]
",
        );
        for vm in ["closed", "listed"] {
            let (text, status) = run_check(&path, vm, "factory");
            assert_eq!(status, GuestShmStatus::IllegalName, "{vm}: {text}");
            assert!(text.contains("decision: illegal\n"), "{vm}: {text}");
            assert!(
                text.contains("reason: guest name: the name factory is reserved"),
                "{vm}: {text}"
            );
        }
        std::fs::remove_file(path).unwrap();
    }

    /// The socket is where the VM's directory has the region, under the VM's name for it,
    /// which may differ from the name asked for when both map to the same host name.
    #[test]
    fn the_socket_line_names_the_vms_socket() {
        let path = config("socket", "root = \"/r\"\n[vm.v]\nsubst = \"foo,guest1\"\n");
        let (text, _) = run_check(&path, "v", "foomem");
        assert!(text.contains("host name: guest1mem\n"), "{text}");
        assert!(text.contains("socket: /r/v/foomem.sock\n"), "{text}");
        let (text, _) = run_check(&path, "v", "guest1mem");
        assert!(text.contains("host name: guest1mem\n"), "{text}");
        assert!(text.contains("socket: /r/v/foomem.sock\n"), "{text}");
        std::fs::remove_file(path).unwrap();
    }
}
