//! The help of every `ivshm` command speaks one language: a flag name means one thing with one
//! placeholder (metavar) wherever it appears, the shared concepts have the placeholders the
//! docs use (`--socket <PATH>`, `--timeout <SECONDS>`, `--peer <ID>`, `--count <N>`, ...), and
//! flags whose absence changes what a command does say what happens without them. New commands
//! are held to it by walking clap's command tree, not a list.

use std::collections::BTreeMap;

use clap::CommandFactory;
use ivshm_cli::cli::Cli;

/// One value-taking flag as it appears in one command.
struct Use {
    command: String,
    metavar: String,
    help: String,
}

/// Every long flag that takes a value, by name, with each command that has it.
fn flags() -> BTreeMap<String, Vec<Use>> {
    fn walk(command: &clap::Command, path: &str, out: &mut BTreeMap<String, Vec<Use>>) {
        for arg in command.get_arguments() {
            let (Some(long), Some(names)) = (arg.get_long(), arg.get_value_names()) else {
                continue;
            };
            if !arg.get_action().takes_values() {
                continue;
            }
            let metavar = names
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            out.entry(long.to_string()).or_default().push(Use {
                command: path.to_string(),
                metavar,
                help,
            });
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut command = Cli::command();
    command.build();
    let mut out = BTreeMap::new();
    walk(&command, "ivshm", &mut out);
    out
}

#[test]
fn one_metavar_per_flag_name_across_every_command() {
    let mut inconsistent = Vec::new();
    for (long, uses) in flags() {
        let first = &uses[0].metavar;
        if uses.iter().any(|u| &u.metavar != first) {
            let seen: Vec<String> = uses
                .iter()
                .map(|u| format!("{}: <{}>", u.command, u.metavar))
                .collect();
            inconsistent.push(format!("--{long}: {}", seen.join(", ")));
        }
    }
    assert!(
        inconsistent.is_empty(),
        "flags with different placeholders in different commands:\n{}",
        inconsistent.join("\n")
    );
}

/// The placeholders of the shared concepts, as the docs write them.
const CONCEPTS: &[(&str, &str)] = &[
    ("socket", "PATH"),
    ("control", "PATH"),
    ("pidfile", "PATH"),
    ("config", "FILE"),
    ("domain", "FILE"),
    ("qemu-conf", "FILE"),
    ("dir", "DIR"),
    ("timeout", "SECONDS"),
    ("peer", "ID"),
    ("count", "N"),
    ("vector", "V"),
    ("vectors", "N"),
    ("peer-limit", "N"),
    ("rounds", "N"),
    ("warmup", "N"),
    ("size", "SIZE"),
    ("offset", "OFFSET"),
    ("poll-offset", "OFFSET"),
    ("len", "LEN"),
    ("socket-mode", "OCTAL"),
    ("socket-group", "GROUP"),
    ("shm-name", "NAME"),
    ("metrics", "ADDR"),
];

#[test]
fn shared_concepts_have_the_documented_metavars() {
    let flags = flags();
    let mut wrong = Vec::new();
    for (long, metavar) in CONCEPTS {
        let Some(uses) = flags.get(*long) else {
            wrong.push(format!(
                "--{long}: no command has it any more (update this table)"
            ));
            continue;
        };
        for u in uses {
            if u.metavar != *metavar {
                wrong.push(format!(
                    "{} --{long} <{}>: should be <{metavar}>",
                    u.command, u.metavar
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn count_and_timeout_say_what_happens_without_them() {
    let flags = flags();
    for long in ["count", "timeout"] {
        for u in &flags[long] {
            if u.command.ends_with("guest bench") {
                // A default value: the help shows it.
                continue;
            }
            assert!(
                u.help.contains("without") || u.help.contains("Without"),
                "{} --{long}: the help does not say what happens without it: {:?}",
                u.command,
                u.help
            );
        }
    }
}

#[test]
fn policy_check_names_its_three_outcomes() {
    let mut command = Cli::command();
    command.build();
    let check = command
        .find_subcommand("policy")
        .and_then(|p| p.find_subcommand("check"))
        .unwrap();
    let about = check
        .get_long_about()
        .or(check.get_about())
        .unwrap()
        .to_string();
    for outcome in ["allow", "deny", "illegal"] {
        assert!(about.contains(outcome), "no {outcome:?} in {about:?}");
    }
}
