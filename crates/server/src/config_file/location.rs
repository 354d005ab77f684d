//! Where something is in the file's text: its line, and the option (`table.key`) written there.

/// The 1-based line of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The option written at byte `offset`, for errors TOML reports with a position only: the
/// table (`defaults`, `vm.vm0`, `region[1]` for the second `[[region]]`) and the key on that
/// line (`defaults.vectors`). `None` when the offset is outside any table and key.
pub(super) fn option_at(text: &str, offset: usize) -> Option<String> {
    let index = line_of(text, offset) - 1;
    let lines: Vec<&str> = text.lines().take(index + 1).collect();
    let key = lines
        .get(index)
        .filter(|line| table_header(line).is_none())
        .and_then(|line| line.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('#'));
    let table = lines
        .iter()
        .enumerate()
        .rev()
        .find_map(|(at, line)| table_header(line).map(|header| (at, header)))
        .map(|(at, header)| match header {
            Header::Table(name) => name.to_string(),
            Header::Array(name) => {
                let earlier = lines[..at]
                    .iter()
                    .filter(|line| table_header(line) == Some(header))
                    .count();
                format!("{name}[{earlier}]")
            }
        });
    match (table, key) {
        (Some(table), Some(key)) => Some(format!("{table}.{key}")),
        (table, key) => table.or(key.map(str::to_string)),
    }
}

/// A table header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header<'a> {
    /// `[name]`.
    Table(&'a str),
    /// `[[name]]`.
    Array(&'a str),
}

fn table_header(line: &str) -> Option<Header<'_>> {
    let line = line.trim();
    let line = line
        .split_once('#')
        .map_or(line, |(before, _)| before)
        .trim();
    if let Some(inner) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
        return Some(Header::Array(inner.trim()));
    }
    line.strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .map(|inner| Header::Table(inner.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "root = \"/x\"\n[defaults]\nvectors = 99\n[[region]]\nname = \"a\"\n\
                        [[region]] # second\nsize = -1\n[vm.vm0]\nrules = [\n  \"x\",\n]\n";

    fn at(needle: &str) -> Option<String> {
        option_at(TEXT, TEXT.find(needle).unwrap())
    }

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of(TEXT, 0), 1);
        assert_eq!(line_of(TEXT, TEXT.find("vectors").unwrap()), 3);
        assert_eq!(line_of(TEXT, usize::MAX), TEXT.lines().count() + 1);
    }

    #[test]
    fn options_are_table_dot_key() {
        assert_eq!(at("\"/x\"").as_deref(), Some("root"));
        assert_eq!(at("99").as_deref(), Some("defaults.vectors"));
        assert_eq!(at("\"a\"").as_deref(), Some("region[0].name"));
        assert_eq!(at("-1").as_deref(), Some("region[1].size"));
        assert_eq!(at("rules").as_deref(), Some("vm.vm0.rules"));
        // A continuation line has no key: the table is all that is known.
        assert_eq!(at("\"x\"").as_deref(), Some("vm.vm0"));
        // A header line names its own table.
        assert_eq!(at("[vm.vm0]").as_deref(), Some("vm.vm0"));
        assert_eq!(at("[[region]] #").as_deref(), Some("region[1]"));
        assert_eq!(option_at("", 0), None);
        assert_eq!(option_at("é = 1", 1).as_deref(), Some("é"));
    }
}
