//! Resident memory and CPU time of the process(es) under test, from /proc.

use std::fs;

use crate::net::BoxError;

/// Parses a comma-separated list of PIDs (e.g. nginx master and worker).
pub fn parse_pids(s: &str) -> Result<Vec<u32>, BoxError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().map_err(|_| format!("bad pid {p}").into()))
        .collect()
}

/// Sum of VmRSS over `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> Result<u64, BoxError> {
    let mut total = 0;
    for pid in pids {
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| format!("no VmRSS for pid {pid}"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad VmRSS line for pid {pid}: {line}"))?;
        total += kib;
    }
    Ok(total)
}

/// Sum of user+system CPU time over `pids`, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64, BoxError> {
    let tck = clk_tck();
    let mut ticks: u64 = 0;
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
        // The command name may contain spaces and parentheses: fields are
        // counted after the last ')'. Field 3 (state) is index 0 there, so
        // utime (field 14) is index 11 and stime (field 15) index 12.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("bad /proc stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).ok_or("bad utime")?;
        let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).ok_or("bad stime")?;
        ticks += utime + stime;
    }
    Ok(ticks as f64 / tck)
}

/// Busy CPU time of the whole machine (all CPUs), in seconds, from the first
/// line of /proc/stat: everything but idle and iowait.
pub fn machine_busy_seconds() -> Result<f64, BoxError> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or("empty /proc/stat")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy: u64 = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Ok(busy as f64 / clk_tck())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if tck > 0 {
        tck as f64
    } else {
        100.0
    }
}

/// Raises RLIMIT_NOFILE to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        rl.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = [std::process::id()];
        assert!(rss_kib(&me).unwrap() > 0);
        assert!(cpu_seconds(&me).unwrap() >= 0.0);
        assert!(machine_busy_seconds().unwrap() > 0.0);
        assert_eq!(parse_pids("1, 2,").unwrap(), vec![1, 2]);
    }
}
