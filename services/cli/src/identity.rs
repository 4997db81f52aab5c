//! Who runs this command: the name recorded as `operator:NAME` on the events the CLI appends.
//!
//! The first of these that is set and not blank wins:
//! 1. `BACKSTOP_OPERATOR` (a script or a shared account naming the person behind it);
//! 2. `$USER`;
//! 3. the login name of the process's real uid, from the password database (`getpwuid_r`), so a
//!    script running as root with no `$USER` (cron, systemd units, `env -i`, containers) is
//!    recorded as `operator:root`, not as an anonymous actor;
//! 4. `uid-N` when the uid has no entry in the password database (a container running as an
//!    arbitrary uid), which still tells one caller from another.
//!
//! `unknown` is left only for platforms without uids.

/// The operator name for events this process appends.
pub fn operator() -> String {
    choose(
        std::env::var("BACKSTOP_OPERATOR").ok(),
        std::env::var("USER").ok(),
        uid_login_name,
    )
}

/// The resolution order, apart from the environment so it can be tested.
fn choose(
    backstop_operator: Option<String>,
    user: Option<String>,
    from_uid: impl FnOnce() -> Option<String>,
) -> String {
    let set = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    set(backstop_operator)
        .or_else(|| set(user))
        .or_else(from_uid)
        .unwrap_or_else(|| "unknown".into())
}

/// The login name of the real uid, or `uid-N` when the password database has no entry for it.
#[cfg(unix)]
fn uid_login_name() -> Option<String> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    Some(passwd_name(uid).unwrap_or_else(|| format!("uid-{uid}")))
}

#[cfg(not(unix))]
fn uid_login_name() -> Option<String> {
    None
}

/// The `pw_name` of `uid` via the re-entrant `getpwuid_r` (the non-reentrant `getpwuid` shares a
/// static buffer with every other thread of the process).
#[cfg(unix)]
fn passwd_name(uid: libc::uid_t) -> Option<String> {
    // The buffer holds the entry's strings; the suggested size is a hint, and ERANGE asks for
    // more. Entries of more than a MiB do not exist in practice: stop there rather than loop.
    const MAX_BUFFER: usize = 1 << 20;
    // SAFETY: sysconf only reads a configuration value.
    let hint = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
    let mut size = if hint > 0 { hint as usize } else { 1024 };
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: passwd is a plain C struct of integers and pointers; all-zero is a valid
        // value, and getpwuid_r overwrites it before we read it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live, writable object of the size passed; the
        // strings getpwuid_r stores in `entry` point into `buffer`, which outlives their use.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && size < MAX_BUFFER {
            size *= 2;
            continue;
        }
        if rc != 0 || found.is_null() || entry.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name is a NUL-terminated string inside `buffer`.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
        let name = name.to_string_lossy().trim().to_string();
        return (!name.is_empty()).then_some(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> Option<String> {
        panic!("the uid is only looked up when the environment names nobody")
    }

    #[test]
    fn the_environment_comes_first_in_order_and_blank_values_do_not_count() {
        assert_eq!(
            choose(Some("ops-bot".into()), Some("alice".into()), never),
            "ops-bot"
        );
        assert_eq!(choose(None, Some("alice".into()), never), "alice");
        assert_eq!(
            choose(Some("  ".into()), Some("alice".into()), never),
            "alice"
        );
        assert_eq!(
            choose(Some(String::new()), Some(" ".into()), || Some(
                "root".into()
            )),
            "root"
        );
        assert_eq!(choose(None, None, || None), "unknown");
    }

    #[cfg(unix)]
    #[test]
    fn the_uid_gives_the_same_login_name_as_id() {
        let out = std::process::Command::new("id")
            .arg("-un")
            .output()
            .expect("run id -un");
        assert!(out.status.success(), "id -un failed");
        let expected = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!expected.is_empty());
        assert_eq!(uid_login_name().as_deref(), Some(expected.as_str()));
        // With nothing in the environment the uid decides, and it is never `unknown`.
        assert_eq!(choose(None, None, uid_login_name), expected);
    }

    #[cfg(unix)]
    #[test]
    fn a_uid_without_a_password_entry_has_no_name() {
        // Far above any allocated uid (and not the 32-bit -1, which means "no change" to chown).
        assert_eq!(passwd_name(0x7fff_fff0), None);
    }
}
