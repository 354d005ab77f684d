//! The restrictions list: ordered `allow` / `deny` rules, first match decides.
//!
//! QNX's wording: `allow fnpattern` allows "the guest to create or attach to any shared memory
//! region whose name matches the pattern"; `deny fnpattern` denies "the guest access to any shared
//! memory region whose name matches the pattern"; both may be repeated. "If you use the allow
//! option, the configuration will include an implicit `deny *` check at the end of the
//! restrictions list. The guest will be denied access to all shared memory regions not specified
//! by allow options." With only `deny` options the guest "is allowed to attach to any other shared
//! memory region", i.e. the implicit last rule is `allow *`; an empty list restricts nothing.
//!
//! As implemented: the rules are tried in the order written and the first whose pattern matches
//! the name decides; if none matches, the implicit rule decides ([`ImplicitRule::DenyAll`] as
//! soon as the list holds at least one `allow`, [`ImplicitRule::AllowAll`] otherwise). So
//! `deny pluto` + `allow pluto*` denies `pluto` but allows `plutoplanet`, while the reverse order
//! would allow both. Patterns use [`fnmatch`](mod@crate::fnmatch) with flags 0.

use std::fmt;

use crate::fnmatch::Pattern;

/// One `allow` or `deny` option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `allow fnpattern`: matching names may be created or attached.
    Allow(Pattern),
    /// `deny fnpattern`: matching names may not be created or attached.
    Deny(Pattern),
}

impl Rule {
    /// The rule's pattern.
    pub fn pattern(&self) -> &Pattern {
        match self {
            Self::Allow(pattern) | Self::Deny(pattern) => pattern,
        }
    }

    /// Whether a name this rule matches is permitted.
    pub fn permits(&self) -> bool {
        matches!(self, Self::Allow(_))
    }

    /// The option keyword: `"allow"` or `"deny"`.
    pub fn keyword(&self) -> &'static str {
        match self {
            Self::Allow(_) => "allow",
            Self::Deny(_) => "deny",
        }
    }

    /// Whether the rule's pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.pattern().matches(name)
    }
}

/// Prints the rule as its option line, e.g. `allow test*`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.keyword(), self.pattern())
    }
}

impl std::str::FromStr for Rule {
    type Err = String;

    /// Parses `"allow PATTERN"` or `"deny PATTERN"` (one space or more between them), the form
    /// of the TOML `rules` list.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (keyword, rest) = text.split_once(char::is_whitespace).ok_or_else(|| {
            format!("rule {text:?}: expected \"allow PATTERN\" or \"deny PATTERN\"")
        })?;
        let pattern = Pattern::new(rest.trim()).map_err(|e| format!("rule {text:?}: {e}"))?;
        match keyword {
            "allow" => Ok(Self::Allow(pattern)),
            "deny" => Ok(Self::Deny(pattern)),
            other => Err(format!(
                "rule {text:?}: unknown keyword {other:?}, expected allow or deny"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The rule QNX appends after the explicit ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImplicitRule {
    /// `allow *`: the list has no `allow` rule (only `deny` rules, or none at all).
    AllowAll,
    /// `deny *`: the list has at least one `allow` rule.
    DenyAll,
}

impl ImplicitRule {
    /// Whether a name that reaches this rule is permitted.
    pub fn permits(self) -> bool {
        matches!(self, Self::AllowAll)
    }
}

impl fmt::Display for ImplicitRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AllowAll => "implicit allow * (no allow rules)",
            Self::DenyAll => "implicit deny * (allow rules are present)",
        })
    }
}

/// Which rule decided about a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleMatch {
    /// An explicit rule matched.
    Explicit {
        /// Its position in the list, from 0.
        index: usize,
        /// The rule.
        rule: Rule,
    },
    /// No explicit rule matched; the implicit final rule decided.
    Implicit(ImplicitRule),
}

impl RuleMatch {
    /// Whether the deciding rule permits the name.
    pub fn permits(&self) -> bool {
        match self {
            Self::Explicit { rule, .. } => rule.permits(),
            Self::Implicit(implicit) => implicit.permits(),
        }
    }
}

/// Prints e.g. `rule 2: deny pluto` (counting from 1) or `implicit deny * (...)`.
impl fmt::Display for RuleMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Explicit { index, rule } => write!(f, "rule {}: {rule}", index + 1),
            Self::Implicit(implicit) => implicit.fmt(f),
        }
    }
}

/// An ordered restrictions list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RuleList {
    rules: Vec<Rule>,
}

impl RuleList {
    /// A list with these rules, in this order.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Appends a rule at the end (before the implicit one).
    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    /// The explicit rules in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether there are no explicit rules (everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule that applies when no explicit rule matches.
    pub fn implicit_rule(&self) -> ImplicitRule {
        if self.rules.iter().any(Rule::permits) {
            ImplicitRule::DenyAll
        } else {
            ImplicitRule::AllowAll
        }
    }

    /// Finds the rule that decides about `name`: the first explicit rule that matches, else the
    /// implicit one.
    pub fn evaluate(&self, name: &str) -> RuleMatch {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(name))
            .map_or_else(
                || RuleMatch::Implicit(self.implicit_rule()),
                |(index, rule)| RuleMatch::Explicit {
                    index,
                    rule: rule.clone(),
                },
            )
    }

    /// Whether the guest may create or attach to a region called `name`.
    pub fn permits(&self, name: &str) -> bool {
        self.evaluate(name).permits()
    }
}

impl FromIterator<Rule> for RuleList {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(p: &str) -> Rule {
        Rule::Allow(Pattern::new(p).unwrap())
    }

    fn deny(p: &str) -> Rule {
        Rule::Deny(Pattern::new(p).unwrap())
    }

    /// Seed example 1: `allow test*` + `allow pluto` allows names beginning with `test` and the
    /// name `pluto`; everything else is denied by the implicit `deny *`.
    #[test]
    fn seed_allow_test_star_and_pluto() {
        let list = RuleList::new(vec![allow("test*"), allow("pluto")]);
        assert_eq!(list.implicit_rule(), ImplicitRule::DenyAll);
        for name in ["test", "test1", "testing", "pluto"] {
            assert!(list.permits(name), "{name}");
        }
        for name in ["plutoplanet", "tes", "mars", "atest"] {
            assert!(!list.permits(name), "{name}");
        }
        assert_eq!(
            list.evaluate("pluto"),
            RuleMatch::Explicit {
                index: 1,
                rule: allow("pluto")
            }
        );
        assert_eq!(
            list.evaluate("mars"),
            RuleMatch::Implicit(ImplicitRule::DenyAll)
        );
    }

    /// Seed example 2: `deny live*` + `deny pluto` denies names beginning with `live` and the
    /// name `pluto`; "the guest is allowed to attach to any other shared memory region".
    #[test]
    fn seed_deny_live_star_and_pluto() {
        let list = RuleList::new(vec![deny("live*"), deny("pluto")]);
        assert_eq!(list.implicit_rule(), ImplicitRule::AllowAll);
        for name in ["live", "livestream", "pluto"] {
            assert!(!list.permits(name), "{name}");
        }
        for name in ["plutoplanet", "test", "alive"] {
            assert!(list.permits(name), "{name}");
        }
        assert_eq!(
            list.evaluate("livefeed"),
            RuleMatch::Explicit {
                index: 0,
                rule: deny("live*")
            }
        );
    }

    /// Seed example 3: `deny pluto` + `allow pluto*` denies `pluto` but allows other names
    /// beginning with `pluto` (e.g. `plutoplanet`); the `allow` makes the implicit rule `deny *`.
    #[test]
    fn seed_deny_pluto_then_allow_pluto_star() {
        let list = RuleList::new(vec![deny("pluto"), allow("pluto*")]);
        assert!(!list.permits("pluto"));
        assert!(list.permits("plutoplanet"));
        assert!(!list.permits("mars"));
        assert_eq!(
            list.evaluate("pluto"),
            RuleMatch::Explicit {
                index: 0,
                rule: deny("pluto")
            }
        );
        assert_eq!(
            list.evaluate("plutoplanet"),
            RuleMatch::Explicit {
                index: 1,
                rule: allow("pluto*")
            }
        );
    }

    #[test]
    fn first_match_wins_so_order_matters() {
        let list = RuleList::new(vec![allow("pluto*"), deny("pluto")]);
        assert!(list.permits("pluto"));
    }

    #[test]
    fn empty_list_allows_everything() {
        let list = RuleList::default();
        assert!(list.is_empty());
        assert!(list.permits("anything"));
        assert_eq!(
            list.evaluate("x"),
            RuleMatch::Implicit(ImplicitRule::AllowAll)
        );
    }

    #[test]
    fn display_names_the_deciding_rule() {
        let list: RuleList = [deny("pluto"), allow("pluto*")].into_iter().collect();
        assert_eq!(list.evaluate("pluto").to_string(), "rule 1: deny pluto");
        assert_eq!(list.evaluate("plutox").to_string(), "rule 2: allow pluto*");
        assert_eq!(
            list.evaluate("mars").to_string(),
            "implicit deny * (allow rules are present)"
        );
    }
}
