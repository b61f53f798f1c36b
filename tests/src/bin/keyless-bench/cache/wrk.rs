//! The load generator of `cache`: wrk, with a script that reports totals and the
//! latency distribution in a form that pools over rounds.

use anyhow::{bail, ensure, Context, Result};

/// Prefix of the lines the wrk script prints.
const WRK_MARK: &str = "KEYLESS-BENCH";
/// Quantiles of each run's latency that the wrk script prints.
const LATENCY_POINTS: u32 = 1000;
/// wrk script: prints the totals and the latency at the midpoints of 1000 equal slices
/// of the distribution (µs), so that rounds can be pooled: each point stands for 1/1000
/// of its run's requests. (wrk 4.1 gives scripts percentiles, not the histogram.)
pub(super) const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KEYLESS-BENCH total %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout))
  if summary.requests > 0 then
    for i = 0, 999 do
      io.write(string.format("KEYLESS-BENCH lat %d\n", latency:percentile((i + 0.5) / 10)))
    end
  end
end
"#;

/// One wrk run, or several pooled.
#[derive(Default)]
pub(super) struct Run {
    pub(super) requests: u64,
    /// Bytes wrk read (headers and bodies).
    pub(super) bytes: u64,
    pub(super) secs: f64,
    pub(super) connect_errors: u64,
    pub(super) read_errors: u64,
    pub(super) write_errors: u64,
    /// Responses other than 2xx and 3xx.
    pub(super) status_errors: u64,
    pub(super) timeouts: u64,
    /// Latency distribution: (µs, requests it stands for), sorted by µs.
    latency: Vec<(u64, f64)>,
    /// CPU seconds of the side's server processes.
    pub(super) server_cpu: f64,
    /// CPU seconds of wrk.
    pub(super) wrk_cpu: f64,
    /// CPU seconds of the whole machine.
    pub(super) machine_cpu: f64,
    /// Requests the test origin answered meanwhile (0 when the side serves from cache).
    pub(super) origin_requests: u64,
}

impl Run {
    pub(super) fn rate(&self) -> f64 {
        self.requests as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    pub(super) fn errors(&self) -> u64 {
        self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.status_errors
            + self.timeouts
    }

    pub(super) fn cores(&self, cpu: f64) -> f64 {
        cpu / self.secs.max(f64::MIN_POSITIVE)
    }

    /// Cores used by processes other than the server and wrk.
    pub(super) fn other_cores(&self) -> f64 {
        self.cores(self.machine_cpu - self.server_cpu - self.wrk_cpu)
            .max(0.0)
    }

    pub(super) fn add(&mut self, other: &Run) {
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.secs += other.secs;
        self.connect_errors += other.connect_errors;
        self.read_errors += other.read_errors;
        self.write_errors += other.write_errors;
        self.status_errors += other.status_errors;
        self.timeouts += other.timeouts;
        self.server_cpu += other.server_cpu;
        self.wrk_cpu += other.wrk_cpu;
        self.machine_cpu += other.machine_cpu;
        self.origin_requests += other.origin_requests;
        let mut merged = std::mem::take(&mut self.latency);
        merged.extend_from_slice(&other.latency);
        merged.sort_unstable_by_key(|&(us, _)| us);
        for (us, n) in merged {
            match self.latency.last_mut() {
                Some(last) if last.0 == us => last.1 += n,
                _ => self.latency.push((us, n)),
            }
        }
    }

    /// The `q` quantile of the latencies in milliseconds, NaN if none.
    pub(super) fn latency_ms(&self, q: f64) -> f64 {
        let total: f64 = self.latency.iter().map(|&(_, n)| n).sum();
        if total <= 0.0 {
            return f64::NAN;
        }
        let rank = total * q;
        let mut seen = 0.0;
        for &(us, n) in &self.latency {
            seen += n;
            if seen >= rank {
                return us as f64 / 1000.0;
            }
        }
        f64::NAN
    }
}

/// Reads what [`WRK_SCRIPT`] printed.
pub(super) fn parse_wrk(text: &str) -> Result<Run> {
    let mut run = Run::default();
    let mut total = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(WRK_MARK) {
            continue;
        }
        let kind = fields.next();
        let numbers: Vec<u64> = fields
            .map(|f| f.parse::<u64>().with_context(|| format!("{line:?}")))
            .collect::<Result<_>>()?;
        match (kind, numbers.as_slice()) {
            (
                Some("total"),
                &[requests, bytes, duration_us, connect, read, write, status, timeout],
            ) => {
                run.requests = requests;
                run.bytes = bytes;
                run.secs = duration_us as f64 / 1e6;
                run.connect_errors = connect;
                run.read_errors = read;
                run.write_errors = write;
                run.status_errors = status;
                run.timeouts = timeout;
                total = true;
            }
            (Some("lat"), &[us]) => run.latency.push((us, 0.0)),
            _ => bail!("unexpected line {line:?}"),
        }
    }
    ensure!(total, "no `{WRK_MARK} total` line (did the script run?)");
    let points = run.latency.len();
    ensure!(
        points == 0 || points == LATENCY_POINTS as usize,
        "{points} latency points, expected {LATENCY_POINTS}"
    );
    let weight = run.requests as f64 / f64::from(LATENCY_POINTS);
    for point in &mut run.latency {
        point.1 = weight;
    }
    run.latency.sort_unstable_by_key(|&(us, _)| us);
    Ok(run)
}
