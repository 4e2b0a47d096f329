//! The requests waiting for a group's paced slots, and who gets the next one.
//!
//! When every backend of a group is paced (its quota spent for now) and a request may wait, it
//! joins the group's waitlist instead of booking the last slot: a driver task, running while
//! anyone waits, hands each slot out as it comes due. Who gets it:
//! - an [`Interactive`](Priority::Interactive) request before any [`Batch`](Priority::Batch)
//!   one;
//! - within a priority, tenants in turn (weighted round robin: a tenant of weight 3 gets three
//!   slots per round, one of weight 1 one), so a client sending ten times more than the others
//!   does not push their requests behind its own; a tenant that had no one waiting goes
//!   first (as FQ-CoDel serves new flows first), so a quiet client's request gets the next
//!   slot;
//! - within a tenant, first come first served.
//!
//! A request without a [`Tenant`] is the tenant `""` at weight 1: with no tenants at all the
//! waitlist is one first-come-first-served line, as the booked slots were before.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::state::Circuit;

/// Who a request is for, as a request extension. When requests wait for a group's paced slots
/// (every backend's quota spent for now), each tenant gets slots in turn, `weight` of them per
/// round, and a [`Priority::Batch`] request only gets a slot no interactive request is waiting
/// for. A tenant alone gets every slot. Without it a request is the tenant `""` (weight 1,
/// interactive). The gateway sets it from the client's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's name (a client key's name, a team, a user).
    pub name: Arc<str>,
    /// Slots per round when tenants wait together (at least 1; 0 counts as 1).
    pub weight: u32,
    /// Whether the request may wait behind interactive ones.
    pub priority: Priority,
}

/// The tenant `""`, weight 1, interactive: a request without a `Tenant` is this one.
impl Default for Tenant {
    fn default() -> Self {
        Tenant {
            name: Arc::from(""),
            weight: 1,
            priority: Priority::Interactive,
        }
    }
}

/// A request's class when it waits for a slot (see [`Tenant`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Someone waits for the answer: served before any batch request (the default).
    #[default]
    Interactive,
    /// A job that can wait: it gets only the slots no interactive request is waiting for, and,
    /// as it waits behind them, it is the first refused when the wait would exceed its budget.
    Batch,
}

/// One waiting request's place in line.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// The request's estimated token cost, booked with its slot.
    cost: u32,
    /// Its turn came: the backend and the time of the paced slot booked for it, or (`None`)
    /// on any backend, as the balancer picks (the line is not the way in any more).
    granted: OnceLock<Option<(Arc<str>, Instant)>>,
    notify: Notify,
    /// [`WAITING`], [`GRANTED`] or [`GONE`] (the request stopped waiting: its budget or
    /// deadline ran out, or it was dropped).
    state: AtomicU8,
    /// The line it waits in (told when it leaves, so a driver with no one left stops).
    list: Weak<Waitlist>,
    /// Whom it waits for.
    tenant: Option<Tenant>,
    /// When it joined.
    joined: Instant,
}

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const GONE: u8 = 2;

impl Ticket {
    /// Waits for its turn: the backend and time of the slot booked for it (its admission is
    /// already counted), or `None` to pick as usual.
    pub(crate) async fn granted(&self) -> Option<(Arc<str>, Instant)> {
        loop {
            if let Some(b) = self.granted.get() {
                return b.clone();
            }
            self.notify.notified().await;
        }
    }

    /// When a request of the same tenant joining now could expect its slot (for the
    /// `retry-after` of a request that stops waiting).
    pub(crate) fn estimate(&self) -> Option<Instant> {
        let now = Instant::now();
        let list = self.list.upgrade()?;
        list.estimate(now, self.tenant.as_ref()).map(|w| now + w)
    }

    /// The request stops waiting: its turn is skipped.
    pub(crate) fn leave(&self) {
        if self
            .state
            .compare_exchange(WAITING, GONE, AcqRel, Acquire)
            .is_ok()
            && let Some(list) = self.list.upgrade()
            && list.live.fetch_sub(1, AcqRel) == 1
        {
            list.idle.notify_one();
        }
    }
}

/// Whether `b` can take requests at all (a weight, its circuit closed).
fn open(b: &Backend) -> bool {
    b.weight() > 0.0 && b.state().circuit() == Circuit::Closed
}

/// Whether `b` is a paced backend that can take requests: one whose slots are handed out (by
/// the line, or booked directly by a `Balance`).
pub(crate) fn paced_open(b: &Backend) -> bool {
    open(b) && b.state().is_paced()
}

/// Holds a place in line; leaving it (drop) gives the place up.
#[derive(Debug)]
pub(crate) struct Place(pub(crate) Arc<Ticket>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Where a `Balance` leaves the ticket of a request it put in line (a retry layer creates it
/// with the attempt, and waits on the ticket when the attempt is refused).
pub(crate) type Slot = Arc<OnceLock<Arc<Ticket>>>;

#[derive(Debug)]
struct Queue {
    weight: u32,
    /// Slots left to this tenant in the current round.
    credit: u32,
    tickets: VecDeque<Arc<Ticket>>,
}

/// The tenants of one priority waiting, in round-robin order.
#[derive(Debug, Default)]
struct Round {
    queues: HashMap<Arc<str>, Queue>,
    order: VecDeque<Arc<str>>,
}

impl Round {
    fn push(&mut self, tenant: &Arc<str>, weight: u32, ticket: Arc<Ticket>) {
        let weight = weight.max(1);
        let q = self.queues.entry(tenant.clone()).or_insert_with(|| Queue {
            weight,
            credit: weight,
            tickets: VecDeque::new(),
        });
        if q.tickets.is_empty() {
            // A tenant that had no one waiting goes first, as FQ-CoDel serves new flows
            // first: a quiet client's request gets the next slot, and a busy client, whose
            // line never empties, cannot use this to get more than its turns.
            self.order.push_front(tenant.clone());
        }
        q.weight = weight;
        q.tickets.push_back(ticket);
    }

    /// How many tickets would be served before one `tenant` put in line now: its own line,
    /// and of every other tenant as many as get slots while its line is served (in
    /// proportion to the weights).
    fn ahead_of_new(&self, tenant: &str, weight: u32) -> usize {
        let weight = weight.max(1) as usize;
        let waiting = self.queues.get(tenant).map_or(0, |q| q.tickets.len());
        if waiting == 0 {
            // It would go first.
            return 0;
        }
        let mine = waiting + 1;
        let rounds = mine.div_ceil(weight);
        let others: usize = self
            .queues
            .iter()
            .filter(|(name, _)| &***name != tenant)
            .map(|(_, o)| o.tickets.len().min(rounds * o.weight as usize))
            .sum();
        mine - 1 + others
    }

    /// Drops the tickets whose requests stopped waiting (so the line's length is true).
    fn prune(&mut self) {
        for q in self.queues.values_mut() {
            q.tickets.retain(|t| t.state.load(Acquire) == WAITING);
        }
        let queues = &self.queues;
        self.order
            .retain(|name| queues.get(name).is_some_and(|q| !q.tickets.is_empty()));
        self.queues.retain(|_, q| !q.tickets.is_empty());
    }

    fn len(&self) -> usize {
        self.queues.values().map(|q| q.tickets.len()).sum()
    }

    /// The next waiting ticket in turn, marked granted (gone ones skipped and dropped).
    fn pop(&mut self) -> Option<Arc<Ticket>> {
        while let Some(name) = self.order.front().cloned() {
            let q = self.queues.get_mut(&name)?;
            let ticket = q.tickets.pop_front();
            q.credit = q.credit.saturating_sub(1);
            if q.tickets.is_empty() {
                self.order.pop_front();
                self.queues.remove(&name);
            } else if q.credit == 0 {
                q.credit = q.weight;
                self.order.rotate_left(1);
            }
            match ticket {
                Some(t)
                    if t.state
                        .compare_exchange(WAITING, GRANTED, AcqRel, Acquire)
                        .is_ok() =>
                {
                    return Some(t);
                }
                _ => continue,
            }
        }
        None
    }
}

/// The requests waiting for one group's slots. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Waitlist {
    backends: Box<[Backend]>,
    rounds: Mutex<[Round; 2]>,
    /// Tickets waiting for their turn (neither granted nor gone).
    live: AtomicUsize,
    /// Told when the last waiting ticket leaves.
    idle: Notify,
    driving: AtomicBool,
    /// Whether the line stands, as CoDel judges it (see [`StandingLine`]).
    standing: Mutex<Standing>,
    /// When it stands; `None`: never.
    limit: Option<StandingLine>,
}

/// When a group's line stands, judged as CoDel judges a standing queue: every request given
/// its slot for `interval` waited longer than `target`. A burst that the line absorbs drains
/// within the interval and never stands; a sustained overload does. While it stands, a request
/// that would wait longer than `target` is refused at once, its `retry-after` saying when the
/// line would have served it, so that those served wait about `target` instead of the whole
/// wait budget. It stops standing at the first request given its slot within `target`, or when
/// no one waits.
///
/// Default: a target of 1 s and an interval of 10 s, as long as the retry layer's default wait
/// budget, so that a burst the budget absorbs is still served whole (an interval of 2 s
/// refused 75 of S6s's 600 requests, 10 s of overload). Set with
/// [`BalanceBuilder::standing_line`](crate::balance::BalanceBuilder::standing_line) or
/// [`Settings::standing_line`](crate::stack::Settings::standing_line); `None` there: the line
/// never refuses early, every request may wait its whole budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandingLine {
    /// The wait a line may keep once it stands.
    pub target: Duration,
    /// How long every wait must stay above `target` before the line stands.
    pub interval: Duration,
}

impl Default for StandingLine {
    fn default() -> Self {
        StandingLine {
            target: Duration::from_secs(1),
            interval: Duration::from_secs(10),
        }
    }
}

/// Whether a line stands (see [`StandingLine`]).
#[derive(Debug, Default)]
pub(crate) struct Standing {
    /// Since when every request given its slot waited longer than the target.
    above_since: Option<Instant>,
}

impl Standing {
    fn served(&mut self, waited: Duration, now: Instant, limit: &StandingLine) {
        if waited <= limit.target {
            self.above_since = None;
        } else if self.above_since.is_none() {
            self.above_since = Some(now);
        }
    }

    fn stands(&self, now: Instant, limit: &StandingLine) -> bool {
        self.above_since
            .is_some_and(|since| now.saturating_duration_since(since) >= limit.interval)
    }
}

impl Waitlist {
    pub(crate) fn new(backends: Box<[Backend]>, limit: Option<StandingLine>) -> Waitlist {
        Waitlist {
            backends,
            rounds: Mutex::new([Round::default(), Round::default()]),
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            driving: AtomicBool::new(false),
            standing: Mutex::new(Standing::default()),
            limit,
        }
    }

    /// The wait a standing line keeps, if the line stands (see [`StandingLine`]).
    pub(crate) fn standing_target(&self, now: Instant) -> Option<Duration> {
        let limit = self.limit.as_ref()?;
        self.standing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stands(now, limit)
            .then_some(limit.target)
    }

    /// How many tenants have requests in line.
    pub(crate) fn tenants(&self) -> usize {
        let rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        rounds[0].queues.len() + rounds[1].queues.len()
    }

    /// Whether anyone waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.live.load(Acquire) == 0
    }

    /// How long a request joining now would wait for its slot: until the first slot comes
    /// due, then one slot for each ticket ahead of it at the group's paced rate.
    pub(crate) fn estimate(&self, now: Instant, tenant: Option<&Tenant>) -> Option<Duration> {
        let (_, first) = self.next_slot(now)?;
        let rate: f64 = self
            .open_backends()
            .map(|b| {
                b.state()
                    .slot_spacing()
                    .map_or(f64::INFINITY, |p| 1.0 / p.as_secs_f64())
            })
            .sum();
        let ahead = {
            let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
            rounds[0].prune();
            rounds[1].prune();
            let (name, weight) = tenant.map_or(("", 1), |t| (&*t.name, t.weight));
            match tenant.map(|t| t.priority) {
                Some(Priority::Batch) => rounds[0].len() + rounds[1].ahead_of_new(name, weight),
                _ => rounds[0].ahead_of_new(name, weight),
            }
        };
        let queued = if rate.is_finite() && rate > 0.0 {
            Duration::from_secs_f64(ahead as f64 / rate)
        } else {
            Duration::ZERO
        };
        Some(first.saturating_duration_since(now) + queued)
    }

    /// Puts a request in line and starts the driver if it is not running. Call inside a tokio
    /// runtime.
    pub(crate) fn join(self: &Arc<Self>, tenant: Option<&Tenant>, cost: u32) -> Arc<Ticket> {
        let ticket = Arc::new(Ticket {
            cost,
            granted: OnceLock::new(),
            notify: Notify::new(),
            state: AtomicU8::new(WAITING),
            list: Arc::downgrade(self),
            tenant: tenant.cloned(),
            joined: Instant::now(),
        });
        {
            let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
            let (name, weight, class) = match tenant {
                Some(t) => (t.name.clone(), t.weight, t.priority as usize),
                None => (Arc::from(""), 1, 0),
            };
            rounds[class].push(&name, weight, ticket.clone());
            self.live.fetch_add(1, AcqRel);
        }
        if !self.driving.swap(true, AcqRel) {
            tokio::spawn(self.clone().drive());
        }
        ticket
    }

    fn pop(&self) -> Option<Arc<Ticket>> {
        let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        let next = rounds[0].pop().or_else(|| rounds[1].pop());
        if next.is_some() {
            self.live.fetch_sub(1, AcqRel);
        }
        next
    }

    fn open_backends(&self) -> impl Iterator<Item = &Backend> + '_ {
        self.backends.iter().filter(|b| open(b))
    }

    /// The paced backend whose next slot comes first, and when (`now` if one is free), the
    /// better tier first among those free at the same time.
    fn next_slot(&self, now: Instant) -> Option<(usize, Instant)> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| paced_open(b))
            .map(|(i, b)| {
                (
                    i,
                    b.state().unavailable_until(now).unwrap_or(now),
                    b.priority(),
                )
            })
            .min_by_key(|(_, at, priority)| (*at, *priority))
            .map(|(i, at, _)| (i, at))
    }

    /// Books each paced slot for the next in line as it comes due, while anyone waits. With
    /// no paced backend open (paces reset,
    /// circuits open), everyone in line goes to pick as usual: then the line is not the way
    /// in.
    async fn drive(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let next = self.next_slot(now);
            if let Some((_, at)) = next {
                // Booked when it is due: booked earlier (by even 1 ms), the slot's credit is
                // spent before the backend's quota headers of the answers just before it are
                // read, and the simulator's low-rate backends answered 0.24 429s per success.
                if at > now {
                    // Until then, unless everyone leaves first.
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.idle.notified() => {}
                    }
                    if self.stop_if_idle() {
                        return;
                    }
                    continue;
                }
            }
            match self.pop() {
                Some(ticket) => {
                    let served_at = next.map_or(now, |(_, at)| at.max(now));
                    if let Some(limit) = &self.limit {
                        self.standing
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .served(
                                served_at.saturating_duration_since(ticket.joined),
                                now,
                                limit,
                            );
                    }
                    let on = next.map(|(i, at)| {
                        let b = &self.backends[i];
                        b.state().admit_cost(at, ticket.cost);
                        (b.name_arc().clone(), at)
                    });
                    let _ = ticket.granted.set(on);
                    ticket.notify.notify_one();
                }
                None => {
                    if self.stop_if_idle() {
                        return;
                    }
                }
            }
        }
    }

    /// Stops driving when no one waits; true if it stopped. A request joining meanwhile sees
    /// the driver stopped and starts one, or this one carries on.
    fn stop_if_idle(&self) -> bool {
        {
            // Whoever is left in line has gone: clear it.
            let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
            if !self.is_empty() {
                return false;
            }
            *rounds = [Round::default(), Round::default()];
            *self.standing.lock().unwrap_or_else(|e| e.into_inner()) = Standing::default();
        }
        self.driving.store(false, Release);
        // Someone joined between the check and the store: carry on if no one else took over.
        self.is_empty() || self.driving.swap(true, AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Arc<Ticket> {
        Arc::new(Ticket {
            cost: 0,
            granted: OnceLock::new(),
            notify: Notify::new(),
            state: AtomicU8::new(WAITING),
            list: Weak::new(),
            tenant: None,
            joined: Instant::now(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_stands_when_every_wait_stays_above_the_target_for_an_interval() {
        let limit = StandingLine::default();
        let (target, interval) = (limit.target, limit.interval);
        let mut s = Standing::default();
        let t0 = Instant::now();
        let long = target + Duration::from_millis(1);
        s.served(long, t0, &limit);
        assert!(!s.stands(t0, &limit), "one long wait is a burst");
        s.served(long, t0 + interval - Duration::from_millis(1), &limit);
        assert!(!s.stands(t0 + interval - Duration::from_millis(1), &limit));
        s.served(long, t0 + interval, &limit);
        assert!(s.stands(t0 + interval, &limit));
        // One request served within the target: the line does not stand.
        s.served(target, t0 + interval, &limit);
        assert!(!s.stands(t0 + interval * 2, &limit));
    }

    /// Who gets the next `n` slots, given each ticket's tenant in the order they joined.
    fn order(round: &mut Round, tickets: &[(&Arc<str>, Arc<Ticket>)], n: usize) -> Vec<String> {
        let names: Vec<(Arc<Ticket>, String)> = tickets
            .iter()
            .map(|(name, t)| (t.clone(), name.to_string()))
            .collect();
        (0..n)
            .filter_map(|_| round.pop())
            .map(|t| {
                names
                    .iter()
                    .find(|(x, _)| Arc::ptr_eq(x, &t))
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn tenants_take_turns_by_weight_and_a_new_one_goes_first() {
        let (loud, quiet): (Arc<str>, Arc<str>) = ("loud".into(), "quiet".into());
        let mut round = Round::default();
        let mut all = Vec::new();
        for _ in 0..6 {
            let t = ticket();
            round.push(&loud, 2, t.clone());
            all.push((&loud, t));
        }
        // The loud tenant's line is long; a quiet tenant arriving now goes first.
        assert_eq!(round.ahead_of_new("quiet", 1), 0);
        let t = ticket();
        round.push(&quiet, 1, t.clone());
        all.push((&quiet, t));
        let t = ticket();
        round.push(&quiet, 1, t.clone());
        all.push((&quiet, t));
        assert_eq!(
            order(&mut round, &all, 8),
            [
                "quiet", "loud", "loud", "quiet", "loud", "loud", "loud", "loud"
            ]
        );
    }

    #[test]
    fn an_interactive_request_goes_before_batch_ones_that_came_first() {
        let list = Waitlist::new(Box::new([]), Some(StandingLine::default()));
        let (job, user): (Arc<str>, Arc<str>) = ("job".into(), "user".into());
        let batch: Vec<_> = (0..3).map(|_| ticket()).collect();
        let interactive = ticket();
        {
            let mut rounds = list.rounds.lock().unwrap();
            for t in &batch {
                rounds[Priority::Batch as usize].push(&job, 1, t.clone());
            }
            rounds[Priority::Interactive as usize].push(&user, 1, interactive.clone());
        }
        list.live.store(4, Release);
        assert!(Arc::ptr_eq(&list.pop().unwrap(), &interactive));
        for t in &batch {
            assert!(Arc::ptr_eq(&list.pop().unwrap(), t));
        }
        assert!(list.pop().is_none() && list.is_empty());
    }

    #[test]
    fn a_ticket_that_left_is_skipped_and_not_counted() {
        let name: Arc<str> = "a".into();
        let mut round = Round::default();
        let (first, second) = (ticket(), ticket());
        round.push(&name, 1, first.clone());
        round.push(&name, 1, second.clone());
        first.leave();
        round.prune();
        assert_eq!(round.len(), 1);
        assert!(Arc::ptr_eq(&round.pop().unwrap(), &second));
        assert!(round.pop().is_none());
    }
}
