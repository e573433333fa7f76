//! Host name resolution through the system resolver (getaddrinfo: /etc/hosts, nsswitch), which
//! blocks, on resolver threads of the library's own rather than in a client's runtime: a look-up
//! cannot be interrupted, and ws_client_free must not wait for one (it abandons it instead).
//!
//! At most `MAX_THREADS` threads, shared by every client of the process, started when first
//! needed; one that stays idle for `IDLE_EXIT` ends.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

const MAX_THREADS: usize = 4;
const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

struct Pool {
    queue: Mutex<Queue>,
    job_ready: Condvar,
}

static POOL: Pool = Pool {
    queue: Mutex::new(Queue {
        jobs: VecDeque::new(),
        threads: 0,
        idle: 0,
    }),
    job_ready: Condvar::new(),
};

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The addresses of `host` (an IP literal is not looked up).
pub(crate) async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (answer, answered) = tokio::sync::oneshot::channel();
    let host = host.to_owned();
    submit(Box::new(move || {
        // The asker may be gone (its connection ended or its client was freed): fine.
        let _ = answer.send(
            (host.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect),
        );
    }))?;
    answered.await.unwrap_or_else(|_| {
        Err(io::Error::other(
            "the resolver thread ended without an answer",
        ))
    })
}

fn submit(job: Job) -> io::Result<()> {
    let mut queue = lock(&POOL.queue);
    queue.jobs.push_back(job);
    if queue.idle >= queue.jobs.len() || queue.threads == MAX_THREADS {
        POOL.job_ready.notify_one();
        return Ok(());
    }
    queue.threads += 1;
    drop(queue);
    let started = std::thread::Builder::new()
        .name("wsclient-dns".into())
        .spawn(serve);
    if let Err(e) = started {
        let mut queue = lock(&POOL.queue);
        queue.threads -= 1;
        if queue.threads == 0 {
            // Nobody would ever run it.
            queue.jobs.pop_back();
            return Err(e);
        }
    }
    Ok(())
}

/// A resolver thread: runs jobs until it has been idle for `IDLE_EXIT`.
fn serve() {
    let mut queue = lock(&POOL.queue);
    loop {
        if let Some(job) = queue.jobs.pop_front() {
            drop(queue);
            job();
            queue = lock(&POOL.queue);
            continue;
        }
        queue.idle += 1;
        let (guard, waited) = POOL
            .job_ready
            .wait_timeout(queue, IDLE_EXIT)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queue = guard;
        queue.idle -= 1;
        if waited.timed_out() && queue.jobs.is_empty() {
            queue.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_names() {
        assert_eq!(
            lookup("127.0.0.1", 80).await.unwrap(),
            ["127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            lookup("::1", 443).await.unwrap(),
            ["[::1]:443".parse().unwrap()]
        );
        let local = lookup("localhost", 8080).await.unwrap();
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080),
            "{local:?}"
        );
        let many: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async { lookup("localhost", 1).await }))
            .collect();
        for answer in many {
            assert!(!answer.await.unwrap().unwrap().is_empty());
        }
        assert!(lock(&POOL.queue).threads <= MAX_THREADS);
    }
}
