//! Host name resolution through the system resolver (getaddrinfo: /etc/hosts, nsswitch), which
//! blocks, on resolver threads of the library's own rather than in a client's runtime: a look-up
//! cannot be interrupted, and ws_client_free must not wait for one (it abandons it instead).
//!
//! The threads are shared by every client of the process, started when first needed, and end
//! after `IDLE_EXIT` without work. At most `MAX_LIVE` look-ups run at a time for connections
//! that still wait for them; a look-up whose connection is gone (its client freed, its connect
//! timed out) no longer counts, so one stuck in the system resolver cannot starve the others,
//! and one still queued is dropped unrun. `MAX_THREADS` bounds the threads in all.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::sync::lock;

const MAX_LIVE: usize = 4;
const MAX_THREADS: usize = 32;
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// A look-up to run, and whether whoever asked for it still waits (its `Asker` is alive).
struct Job {
    asker: Weak<Asker>,
    run: Box<dyn FnOnce() + Send>,
}

/// Held by a waiting look-up; dropped when it returns or is abandoned.
struct Asker;

struct Queue {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    /// The askers of the look-ups running now.
    running: Vec<Weak<Asker>>,
}

struct Pool {
    queue: Mutex<Queue>,
    job_ready: Condvar,
}

static POOL: Pool = Pool {
    queue: Mutex::new(Queue { jobs: VecDeque::new(), threads: 0, idle: 0, running: Vec::new() }),
    job_ready: Condvar::new(),
};

/// The addresses of `host` (an IP literal is not looked up).
pub(crate) async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let asker = Arc::new(Asker);
    let (answer, answered) = tokio::sync::oneshot::channel();
    let host = host.to_owned();
    submit(Job {
        asker: Arc::downgrade(&asker),
        run: Box::new(move || {
            // The asker may be gone meanwhile: fine.
            let _ = answer.send((host.as_str(), port).to_socket_addrs().map(Iterator::collect));
        }),
    })?;
    let answer = answered.await;
    drop(asker);
    answer.unwrap_or_else(|_| Err(io::Error::other("the resolver thread ended without an answer")))
}

fn submit(job: Job) -> io::Result<()> {
    let mut queue = lock(&POOL.queue);
    queue.jobs.push_back(job);
    // Threads at work for someone who still waits (starting ones included): only those count.
    let abandoned = queue.running.iter().filter(|asker| asker.strong_count() == 0).count();
    let working = queue.threads - queue.idle - abandoned;
    if queue.idle >= queue.jobs.len() || working >= MAX_LIVE || queue.threads >= MAX_THREADS {
        POOL.job_ready.notify_one();
        return Ok(());
    }
    queue.threads += 1;
    drop(queue);
    let started = std::thread::Builder::new().name("wsclient-dns".into()).spawn(serve);
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
            if job.asker.strong_count() == 0 {
                // Nobody waits for it any more.
                continue;
            }
            queue.running.push(job.asker.clone());
            drop(queue);
            (job.run)();
            queue = lock(&POOL.queue);
            if let Some(i) = queue.running.iter().position(|a| a.ptr_eq(&job.asker)) {
                queue.running.swap_remove(i);
            }
            continue;
        }
        queue.idle += 1;
        let (guard, waited) =
            POOL.job_ready.wait_timeout(queue, IDLE_EXIT).unwrap_or_else(|poisoned| poisoned.into_inner());
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
        assert_eq!(lookup("127.0.0.1", 80).await.unwrap(), ["127.0.0.1:80".parse().unwrap()]);
        assert_eq!(lookup("::1", 443).await.unwrap(), ["[::1]:443".parse().unwrap()]);
        let local = lookup("localhost", 8080).await.unwrap();
        assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 8080), "{local:?}");
        let many: Vec<_> = (0..20).map(|_| tokio::spawn(async { lookup("localhost", 1).await })).collect();
        for answer in many {
            assert!(!answer.await.unwrap().unwrap().is_empty());
        }
        assert!(lock(&POOL.queue).threads <= MAX_THREADS);
    }

    /// A job whose asker is gone is not run, and a running one no longer counts.
    #[test]
    fn abandoned_look_ups_do_not_count() {
        let gone = Arc::new(Asker);
        let weak = Arc::downgrade(&gone);
        drop(gone);
        let (ran, told) = std::sync::mpsc::channel();
        submit(Job { asker: weak, run: Box::new(move || ran.send(()).unwrap()) }).unwrap();
        let waiting = Arc::new(Asker);
        let (done, finished) = std::sync::mpsc::channel();
        submit(Job { asker: Arc::downgrade(&waiting), run: Box::new(move || done.send(()).unwrap()) }).unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(told.try_recv().is_err(), "a look-up nobody waits for ran");
    }
}
