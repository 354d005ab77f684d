//! QNX hypervisor `vdev shmem` policy semantics, as pure functions: which named shared memory
//! regions a guest may create or attach to, and under which name the host knows them.
//!
//! The server keeps one [`VmPolicy`] per VM, built from the VM's `vdev shmem` options (QNX
//! syntax, [`VmPolicy::parse_qnx`]) or from TOML fields ([`VmPolicyConfig`]). For every guest
//! request it calls [`VmPolicy::decide`], which returns the [`GuestShmStatus`] the guest reads
//! back (`GSS_OK`, `GSS_NO_PERMISSION` or `GSS_ILLEGAL_NAME`), the host name to use and the rule
//! that decided. At VM start it creates [`VmPolicy::pre_created`] regions.
//!
//! ```
//! use ivshm_policy::{GuestShmStatus, VmPolicy};
//!
//! let vm0 = VmPolicy::parse_qnx(
//!     "vdev shmem
//!          deny foosecret
//!          allow foo*
//!          subst foo,guest0
//!          create foomem,0xf0000",
//! )
//! .unwrap();
//! let decision = vm0.decide("foomem");
//! assert_eq!(decision.status, GuestShmStatus::Ok);
//! assert_eq!(decision.host_name.unwrap().as_str(), "guest0mem");
//! assert_eq!(vm0.decide("foosecret").status, GuestShmStatus::NoPermission);
//! assert_eq!(vm0.decide("bar").status, GuestShmStatus::NoPermission); // implicit `deny *`
//! assert_eq!(vm0.decide("../x").status, GuestShmStatus::IllegalName);
//! assert_eq!(vm0.pre_created()[0].0.as_str(), "guest0mem");
//! ```
//!
//! # The QNX semantics as implemented
//!
//! * **Patterns** ([`fnmatch`](mod@fnmatch)): `allow`/`deny` take "the same syntax as shell file name
//!   expansion": POSIX `fnmatch(pattern, name, 0)`, reproduced byte for byte from glibc in the C
//!   locale (checked against `libc::fnmatch` by property tests), without exponential blow-up.
//!   A pattern that can never match a legal name (a lone trailing `\`, or no bracket
//!   expression and a literal such as the `\*` of a shell command line) is refused
//!   ([`PatternError`]).
//! * **Restrictions list** ([`rules`]): rules are tried in the order written, the first match
//!   decides; after them comes an implicit `deny *` if any `allow` is present ("if you use the
//!   allow option, the configuration will include an implicit deny* check at the end"), else an
//!   implicit `allow *`. So `deny pluto` + `allow pluto*` denies `pluto` and allows
//!   `plutoplanet`.
//! * **Names** ([`name`]): 1 to 31 bytes (`GUEST_SHM_MAX_NAME` 32 with the NUL) from
//!   `[A-Za-z0-9_.+-]`, not starting with `.`, without `..`; anything else is
//!   `GSS_ILLEGAL_NAME`. The same rule holds for host names after substitution and for `create`
//!   names, so a name can never leave the server's per-VM directory. Guests cannot use the name
//!   `factory` either (its socket would be the VM's factory socket).
//! * **`subst [match],prefix`** ([`subst`]): with an empty `match` the prefix is prepended;
//!   otherwise the first occurrence of `match` anywhere in the name is replaced by `prefix`, and
//!   names without `match` are unchanged ("if found"). One `subst` per vdev; it affects only the
//!   `create` options written after it; the substituted name must still fit in 31 bytes.
//! * **Patterns see the guest's name, before substitution** ([`vm`] explains why): the
//!   restrictions list is written in the guest's namespace, like the QNX examples.
//! * **Decision order**: illegal guest name → `GSS_ILLEGAL_NAME`; rules evaluated; illegal
//!   host name → `GSS_ILLEGAL_NAME`; denied → `GSS_NO_PERMISSION`; else `GSS_OK`.
//! * **Option syntax** ([`options`]): optional `vdev shmem` line, `#` comments, one or several
//!   options per line with the argument on the same line, unknown options rejected; sizes and
//!   addresses in decimal, `0x` hex or `0d` decimal with optional `K`/`M`/`G`; `loc` takes QNX's
//!   locations (`ADDRESS`/`mem:ADDRESS`: MMIO mode, needs `intr`; `pci:BUS:DEV[.FUNC]` or a bare
//!   `loc`: PCI mode); `intr` applies in PCI mode too; the common options `name` and
//!   `log FILTERS DESTINATION`; a repeated `loc`/`intr`/`sched`/`name` keeps its last value
//!   (qvm's rule for repeated options) while a second `subst` is an error. Errors carry line,
//!   option and reason ([`ParseError`]).
//! * **TOML form** ([`VmPolicyConfig`]): `rules = ["allow test*", "deny pluto"]` keeps the
//!   order and the implicit final rule; `subst` applies to every `create` (TOML has no line
//!   order); or `qnx = """..."""` holds a verbatim `vdev shmem` block instead of the fields.
//!
//! The other status codes (`GSS_NOMEM`, `GSS_CLIENT_MAX`, `GSS_DOES_NOT_EXIST`,
//! `GSS_UNKNOWN_FAILURE`) depend on runtime state and are the server's to return. The header's
//! constants, register offsets and status codes live in `ivshm_proto::guest_shm` (re-exported
//! here as [`guest_shm`] and [`GuestShmStatus`]).

pub mod fnmatch;
pub mod name;
mod number;
pub mod options;
pub mod rules;
pub mod subst;
pub mod vm;

pub use fnmatch::{fnmatch, Pattern, PatternError};
pub use ivshm_proto::guest_shm::{self, GuestShmStatus};
pub use name::{NameError, RegionName};
pub use number::NumberError;
pub use options::{CreateOption, Interrupt, ParseError, VdevShmem};
pub use rules::{ImplicitRule, Rule, RuleList, RuleMatch};
pub use subst::{Subst, SubstError};
pub use vm::{Decision, IllegalName, VmPolicy, VmPolicyConfig, VmPolicyError};
