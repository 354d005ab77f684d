//! `ivshm generate man|completions DIR` (hidden): man pages and shell completions made from the
//! real clap command, so they can never drift from the flags. The Debian package runs it at
//! build time (`scripts/package`); `docs/cli.md` says where the files go.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use clap_complete::Shell;

/// What to generate.
#[derive(Subcommand, Debug)]
pub enum GenerateCommand {
    /// Man pages: `ivshm.1` and one `ivshm-<command>.1` per subcommand (nested ones joined by
    /// `-`, e.g. `ivshm-guest-wait.1`).
    Man {
        /// Directory to write them to (created if missing).
        dir: PathBuf,
    },
    /// Shell completions: `ivshm.bash`, `_ivshm` (zsh) and `ivshm.fish`.
    Completions {
        /// Directory to write them to (created if missing).
        dir: PathBuf,
    },
}

/// Runs `generate` for the program's own clap command `command`.
pub fn run(generate: GenerateCommand, command: clap::Command) -> anyhow::Result<()> {
    let mut command = command;
    command.build();
    match generate {
        GenerateCommand::Man { dir } => {
            create_dir(&dir)?;
            for path in man_pages(&command, &dir)? {
                println!("{}", path.display());
            }
        }
        GenerateCommand::Completions { dir } => {
            create_dir(&dir)?;
            for path in completions(&mut command, &dir)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Writes the page of `command` and, recursively, of every visible subcommand; returns the
/// files written.
pub fn man_pages(command: &clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let version = command.get_version().unwrap_or_default().to_string();
    write_man(command, command.get_name(), &version, dir, &mut written)?;
    Ok(written)
}

fn write_man(
    command: &clap::Command,
    name: &str,
    version: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // The page's title and NAME section come from the command's name: give a subcommand its
    // full name (`ivshm-guest-wait`), as man page names go, and the program's version.
    let page = command
        .clone()
        .name(name.to_string())
        .version(version.to_string());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    // clap's own `help` subcommand gets no page.
    for sub in command
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_man(
            sub,
            &format!("{name}-{}", sub.get_name()),
            version,
            dir,
            written,
        )?;
    }
    Ok(())
}

/// Writes bash, zsh and fish completions; returns the files written.
pub fn completions(command: &mut clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let name = command.get_name().to_string();
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, command, &name, dir)
            .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
        written.push(path);
    }
    Ok(written)
}
