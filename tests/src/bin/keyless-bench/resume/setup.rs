//! The processes of a `resume` run: the key server, the test origin, three edges and
//! Redis, and the checks that they resume before anything is measured.

use super::*;

/// The listeners of one edge.
#[derive(Clone, Copy)]
pub(super) struct Endpoint {
    pub(super) https: SocketAddr,
    pub(super) admin: SocketAddr,
}

/// The processes of one run. Their pids, in [`Setup::pids`] order, start with this
/// process (the client), then the processes in `procs` order.
pub(super) struct Setup {
    pub(super) deployment: Deployment,
    pub(super) procs: Vec<Proc>,
    pub(super) keyserver_metrics: Vec<SocketAddr>,
    /// The edge with the default `[sessions]` (full and ticket).
    pub(super) edge: Endpoint,
    /// The session-id edges: A makes the sessions, B resumes them.
    pub(super) edge_a: Endpoint,
    pub(super) edge_b: Endpoint,
}

/// Index of the benchmark client in [`Setup::pids`].
pub(super) const CLIENT: usize = 0;

impl Setup {
    pub(super) fn pids(&self) -> Vec<u32> {
        std::iter::once(std::process::id())
            .chain(self.procs.iter().map(Proc::pid))
            .collect()
    }

    /// Index in [`Setup::pids`] of the process named `name`.
    pub(super) fn pid_index(&self, name: &str) -> usize {
        self.procs
            .iter()
            .position(|p| p.name() == name)
            .map_or(usize::MAX, |i| i + 1)
    }

    /// Indexes in [`Setup::pids`] of the processes doing a mode's server work.
    pub(super) fn server_side(&self, mode: Mode) -> Vec<usize> {
        let edges: &[&str] = match mode {
            Mode::Full | Mode::Ticket => &["edge"],
            Mode::SessionId => &["edge A", "edge B", "redis"],
        };
        let keyservers = (self.procs.iter().enumerate())
            .filter(|(_, p)| p.name().starts_with("key server"))
            .map(|(i, _)| i + 1);
        edges
            .iter()
            .map(|n| self.pid_index(n))
            .chain(keyservers)
            .collect()
    }

    /// Operations the key servers have answered `ok` so far (pings not counted).
    pub(super) fn keyserver_ops(&self) -> Result<u64> {
        self.keyserver_metrics
            .iter()
            .map(|&m| keyserver_ops_ok(m))
            .sum()
    }

    pub(super) fn check_running(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_running)
    }

    /// Waits until every edge logs that it holds its group's ticket keys.
    pub(super) fn wait_for_ticket_keys(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for p in self
            .procs
            .iter_mut()
            .filter(|p| p.name().starts_with("edge"))
        {
            while !p.log().contains(KEYS_IN_USE) {
                p.check_running()?;
                if Instant::now() >= deadline {
                    bail!(
                        "{} did not get its group's ticket keys within {READY_TIMEOUT:?}; \
                         log:\n{}",
                        p.name(),
                        p.log_tail(40)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// One checked resumption of each resuming mode before measuring: a ticket from the
/// edge resumes on it over TLS 1.3; a session id made on A resumes on B over TLS 1.2,
/// and B found it in Redis. Retried until [`READY_TIMEOUT`] (A writes to Redis without
/// waiting, so B may look before the session is there).
pub(super) async fn probe_resumption(
    setup: &Setup,
    trust: &Trust,
    name: &ServerName<'static>,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ticket = Visitor::new(Mode::Ticket, trust, name, true)?;
        let first = ticket.visit(setup.edge.https).await;
        let second = ticket.visit(setup.edge.https).await;
        let last = match (first, second) {
            (Ok(_), Ok(v)) if v.resumed && v.version == Some(ProtocolVersion::TLSv1_3) => break,
            (Ok(_), Ok(v)) => format!("second handshake: {v:?}"),
            (Err(e), _) | (_, Err(e)) => e,
        };
        if Instant::now() >= deadline {
            bail!("a TLS 1.3 ticket from the edge did not resume on it: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let redis_before = edge_metrics(setup.edge_b.admin)
            .map(|m| resumptions(&m, "session-redis"))
            .unwrap_or(0.0);
        let session = Visitor::new(Mode::SessionId, trust, name, true)?;
        let on_a = session.visit(setup.edge_a.https).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let on_b = session.visit(setup.edge_b.https).await;
        let redis_after = edge_metrics(setup.edge_b.admin)
            .map(|m| resumptions(&m, "session-redis"))
            .unwrap_or(0.0);
        let last = match (on_a, on_b) {
            (Ok(_), Ok(v))
                if v.resumed
                    && v.version == Some(ProtocolVersion::TLSv1_2)
                    && redis_after > redis_before =>
            {
                return Ok(())
            }
            (Ok(_), Ok(v)) => format!(
                "on edge B: {v:?}, session-redis resumptions {redis_before} -> {redis_after}"
            ),
            (Err(e), _) | (_, Err(e)) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "a TLS 1.2 session id made on edge A did not resume on edge B through \
                 Redis: {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the key server, the test origin and the edge (default `[sessions]`), then
/// Redis and the session-id edges A and B on copies of the edge's config.
pub(super) fn start() -> Result<Setup> {
    let mut base: Option<EdgeConfig> = None;
    let EdgeStack {
        deployment,
        keyservers,
        origin,
        edge,
        edge_addr,
        edge_admin,
        ..
    } = start_edge_stack(DOMAIN, LOG_FILTER, 1, |c| {
        base = Some(c.clone());
        c
    })?;
    let base = base.context("the edge's config was not built")?;
    let dir = deployment.dir().to_path_buf();
    let logs = deployment.logs_dir();
    let keyserver_metrics: Vec<SocketAddr> = keyservers.iter().map(|k| k.metrics).collect();
    let mut procs: Vec<Proc> = keyservers.into_iter().map(|k| k.proc).collect();
    procs.extend([origin, edge]);

    let redis_bin = find_program("redis-server")
        .context("redis-server not found: the session-id mode needs Redis")?;
    let redis_addr = free_addr()?;
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir)
        .with_context(|| format!("creating {}", redis_dir.display()))?;
    let redis_args: Vec<OsString> = [
        "--bind".into(),
        redis_addr.ip().to_string().into(),
        "--port".into(),
        redis_addr.port().to_string().into(),
        "--save".into(),
        "".into(),
        "--appendonly".into(),
        "no".into(),
        "--protected-mode".into(),
        "no".into(),
        "--dir".into(),
        redis_dir.clone().into_os_string(),
    ]
    .into();
    let mut redis = Proc::spawn("redis", &redis_bin, redis_args, &[], logs.join("redis.log"))?;
    redis.wait_port(redis_addr)?;
    procs.push(redis);

    let redis_url = format!("redis://{redis_addr}");
    let edge_bin = binary("keyless-edge", Profile::Release)?;
    let mut session_edge = |name: &str, file: &str, memory_entries: Option<i64>| {
        let mut config = base
            .clone()
            .session_option("tickets", false)
            .session_option("redis", toml::Value::Array(vec![redis_url.as_str().into()]));
        config.https = free_addr()?;
        config.admin = free_addr()?;
        if let Some(n) = memory_entries {
            config = config.session_option("memory_entries", n);
        }
        let path = dir.join(file);
        std::fs::write(&path, config.to_toml())
            .with_context(|| format!("writing {}", path.display()))?;
        let mut p = Proc::spawn(
            name,
            &edge_bin,
            ["--config".as_ref(), path.as_os_str()],
            &[("KEYLESS_LOG", LOG_FILTER)],
            logs.join(format!("{}.log", file.trim_end_matches(".toml"))),
        )?;
        p.wait_http_ok(config.admin, "/healthz")?;
        p.wait_port(config.https)?;
        procs.push(p);
        anyhow::Ok(Endpoint {
            https: config.https,
            admin: config.admin,
        })
    };
    let edge_a = session_edge("edge A", "bench-edge-a.toml", None)?;
    let edge_b = session_edge("edge B", "bench-edge-b.toml", Some(B_MEMORY_ENTRIES))?;

    let setup = Setup {
        deployment,
        procs,
        keyserver_metrics,
        edge: Endpoint {
            https: edge_addr,
            admin: edge_admin,
        },
        edge_a,
        edge_b,
    };
    print_deployment(&dir, &setup.procs, &logs);
    Ok(setup)
}
