//! Placement: which agents run the replicas of a service.
//!
//! Pure: fed a snapshot of agents and a [`Request`], [`place`] returns a [`Placement`]; no I/O, no clock,
//! and no randomness but the request's `seed`, so the same input (agents in the same order) gives the same
//! output. Two stages, as in Nomad's scheduler: feasibility filters (`feasible.go`), then ranking
//! (`rank.go`).
//!
//! **Feasibility**, in this order (an agent that fails several is counted under the first, so the counts
//! in a [`NoPlacement`] add up to the number of agents): not ready; excluded by the request; a constraint
//! label missing or different; not enough free CPU; not enough free memory. Free means capacity minus
//! reservations, including those of replicas placed earlier in the same call.
//!
//! A capacity of 0 means the agent has not reported that resource. It is ignored when the request
//! reserves none of it (0), and otherwise it makes the agent infeasible: an unknown capacity is never
//! assumed to be enough, since treating it as unlimited would pile reservations on an agent whose probe
//! failed.
//!
//! **Ranking**: fewer instances of the service on the agent first (the spread penalty: one per instance,
//! counting replicas placed earlier in this call, which outweighs any bin-packing difference since the
//! fit lies in [0, 1]); then the bin-packing fit, which prefers the agent that would be the most
//! utilised after placement, averaged over CPU and memory with Nomad's `ScoreFitBinPack`; then a hash
//! of the seed and the agent id; then the id. So replicas go to distinct agents while enough are
//! feasible, and share agents only when they must.
//!
//! **Sampling** (Nomad's `LimitIterator`): a placement does not score every agent. It walks the agents in
//! a seed-derived order (a start and a stride coprime with their number, so the walk is a permutation that
//! reaches every agent once, in an order unrelated to the snapshot's), and stops once [`SAMPLE_LIMIT`]
//! (16) feasible agents free of the service have been scored, or twice that many feasible agents in all
//! (the allowance for agents already holding a replica, Nomad's `maxSkip`, keeps spreading working). The
//! bound is a constant because the quality of a best-of-L pick does not depend on the number of agents:
//! it is in the top 10% of the feasible agents with probability about 1 - 0.9^L, 81% for L = 16, and in
//! the top 25% with probability 99%. Nomad uses max(2, ceil(log2 n)) instead, which is 14 for 10,000
//! agents but only 2 for 4, where it misses the best of three feasible agents one time in three; with
//! 16, clusters of up to 16 feasible agents are ranked exactly. A walk that finds fewer feasible agents goes on to the end, so
//! a placement fails only when no agent at all is feasible.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Resources {
    fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentSnapshot {
    pub id: String,
    /// The committed status is "ready" (down and draining agents are not).
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
    /// What the host has; 0 for a resource it has not reported (see the module documentation).
    pub capacity: Resources,
    /// The sum of the resources of the instances already placed on it.
    pub reserved: Resources,
    /// Instances of each service already on this agent (service id -> count), for spreading.
    pub instances: HashMap<String, u32>,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub service_id: String,
    /// Per replica; 0 for a resource means no reservation of it.
    pub resources: Resources,
    /// Every pair must equal a label of the agent.
    pub constraints: BTreeMap<String, String>,
    /// How many replicas to place; 0 gives an empty placement.
    pub replicas: u32,
    /// Agent ids never to use (e.g. the agent that died mid-deployment).
    pub exclude: Vec<String>,
    /// The only source of randomness: where the walk over the agents starts, and how ties are broken.
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// One agent id per replica, in replica order.
    pub agents: Vec<String>,
}

/// No placement for the whole request, with a reason a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct NoPlacement {
    pub reason: String,
}

/// Places the request's replicas one at a time, each one's resources and instance counted on its agent
/// before the next; all of them or none.
pub fn place(agents: &[AgentSnapshot], request: &Request) -> Result<Placement, NoPlacement> {
    let mut scheduler = Scheduler::new(agents, request);
    let mut placed = Vec::new();
    for replica in 0..request.replicas {
        let Some(index) = scheduler.best() else {
            return Err(scheduler.explain(replica));
        };
        scheduler.reserve(index);
        placed.push(agents[index].id.clone());
    }
    Ok(Placement { agents: placed })
}

/// How many feasible agents free of the service a placement scores before it takes the best of them
/// (see the module documentation).
pub const SAMPLE_LIMIT: usize = 16;

/// What replicas placed earlier in this call added to an agent.
#[derive(Clone, Copy, Default)]
struct Added {
    resources: Resources,
    instances: u32,
}

/// Why an agent cannot take the next replica, in the order the filters apply.
enum Rejection {
    NotReady,
    Excluded,
    /// The index of the constraint in the request's (sorted) constraints.
    Label(usize),
    Cpu {
        free: u64,
    },
    Memory {
        free: u64,
    },
}

struct Candidate {
    index: usize,
    /// Of this service, including replicas placed earlier in this call.
    instances: u32,
    fit: f64,
}

struct Scheduler<'a> {
    agents: &'a [AgentSnapshot],
    request: &'a Request,
    /// Sorted, for a binary search per agent.
    excluded: Vec<&'a str>,
    added: BTreeMap<usize, Added>,
    start: usize,
    stride: usize,
}

impl<'a> Scheduler<'a> {
    fn new(agents: &'a [AgentSnapshot], request: &'a Request) -> Self {
        let mut excluded: Vec<&str> = request.exclude.iter().map(String::as_str).collect();
        excluded.sort_unstable();
        excluded.dedup();
        let n = agents.len();
        let (start, stride) = walk(request.seed, n);
        Scheduler { agents, request, excluded, added: BTreeMap::new(), start, stride }
    }

    /// The agent for the next replica, or None when no agent is feasible.
    fn best(&self) -> Option<usize> {
        let n = self.agents.len();
        let mut best: Option<Candidate> = None;
        let (mut scored, mut free_of_service) = (0, 0);
        let mut index = self.start;
        for _ in 0..n {
            if let Ok(reserved) = self.check(index) {
                let candidate = self.candidate(index, reserved);
                scored += 1;
                if candidate.instances == 0 {
                    free_of_service += 1;
                }
                if best.as_ref().is_none_or(|best| self.better(&candidate, best)) {
                    best = Some(candidate);
                }
                if free_of_service >= SAMPLE_LIMIT || scored >= 2 * SAMPLE_LIMIT {
                    break;
                }
            }
            index += self.stride;
            if index >= n {
                index -= n;
            }
        }
        best.map(|candidate| candidate.index)
    }

    /// The agent's reservations including this call's replicas, if it can take the next replica.
    fn check(&self, index: usize) -> Result<Resources, Rejection> {
        let agent = &self.agents[index];
        if !agent.ready {
            return Err(Rejection::NotReady);
        }
        if !self.excluded.is_empty() && self.excluded.binary_search(&agent.id.as_str()).is_ok() {
            return Err(Rejection::Excluded);
        }
        for (i, (key, value)) in self.request.constraints.iter().enumerate() {
            if agent.labels.get(key) != Some(value) {
                return Err(Rejection::Label(i));
            }
        }
        let reserved = match self.added.get(&index) {
            Some(added) => agent.reserved.saturating_add(added.resources),
            None => agent.reserved,
        };
        let need = self.request.resources;
        if need.cpu_millis > 0 {
            let free = agent.capacity.cpu_millis.saturating_sub(reserved.cpu_millis);
            if free < need.cpu_millis {
                return Err(Rejection::Cpu { free });
            }
        }
        if need.memory_bytes > 0 {
            let free = agent.capacity.memory_bytes.saturating_sub(reserved.memory_bytes);
            if free < need.memory_bytes {
                return Err(Rejection::Memory { free });
            }
        }
        Ok(reserved)
    }

    fn candidate(&self, index: usize, reserved: Resources) -> Candidate {
        let agent = &self.agents[index];
        let mut instances = self.added.get(&index).map_or(0, |added| added.instances);
        if !agent.instances.is_empty() {
            instances = instances.saturating_add(agent.instances.get(&self.request.service_id).copied().unwrap_or(0));
        }
        let need = self.request.resources;
        let cpu = free_fraction(agent.capacity.cpu_millis, reserved.cpu_millis, need.cpu_millis);
        let memory = free_fraction(agent.capacity.memory_bytes, reserved.memory_bytes, need.memory_bytes);
        Candidate { index, instances, fit: binpack_fit(cpu, memory) }
    }

    /// Whether `a` ranks strictly before `b`.
    fn better(&self, a: &Candidate, b: &Candidate) -> bool {
        let by_rank = a.instances.cmp(&b.instances).then(b.fit.total_cmp(&a.fit));
        let order = by_rank.then_with(|| {
            let (a_id, b_id) = (&self.agents[a.index].id, &self.agents[b.index].id);
            tie_key(self.request.seed, a_id).cmp(&tie_key(self.request.seed, b_id)).then_with(|| a_id.cmp(b_id))
        });
        order.is_lt()
    }

    fn reserve(&mut self, index: usize) {
        let added = self.added.entry(index).or_default();
        added.resources = added.resources.saturating_add(self.request.resources);
        added.instances = added.instances.saturating_add(1);
    }

    /// Why no agent can take replica `replica` (0-based): a full pass counting each filter.
    fn explain(&self, replica: u32) -> NoPlacement {
        let (mut not_ready, mut excluded) = (0u32, 0u32);
        let mut labels = vec![0u32; self.request.constraints.len()];
        let (mut cpu, mut memory) = (Shortfall::default(), Shortfall::default());
        for (index, agent) in self.agents.iter().enumerate() {
            match self.check(index) {
                Err(Rejection::NotReady) => not_ready += 1,
                Err(Rejection::Excluded) => excluded += 1,
                Err(Rejection::Label(i)) => labels[i] += 1,
                Err(Rejection::Cpu { free }) => cpu.add(free, agent.capacity.cpu_millis == 0),
                Err(Rejection::Memory { free }) => memory.add(free, agent.capacity.memory_bytes == 0),
                Ok(_) => {}
            }
        }

        let need = self.request.resources;
        let mut parts: Vec<(u32, &str, &str, String)> = Vec::new();
        parts.push((not_ready, "is", "are", "not ready".into()));
        parts.push((excluded, "is", "are", "excluded by the request".into()));
        for ((key, value), count) in self.request.constraints.iter().zip(labels) {
            parts.push((count, "lacks", "lack", format!("the label {key}={value}")));
        }
        let cpu_detail = cpu.detail(cpu_text(need.cpu_millis), cpu_text(cpu.most_free), "CPU");
        parts.push((cpu.count, "lacks", "lack", format!("CPU ({cpu_detail})")));
        let memory_detail =
            memory.detail(bytes_text(need.memory_bytes, true), bytes_text(memory.most_free, false), "memory");
        parts.push((memory.count, "lacks", "lack", format!("memory ({memory_detail})")));

        let mut details = Vec::new();
        for (count, singular, plural, what) in parts.into_iter().filter(|part| part.0 > 0) {
            let verb = if count == 1 { singular } else { plural };
            // The first count names what it counts; the others read on from it.
            let noun = match (details.is_empty(), count) {
                (false, _) => "",
                (true, 1) => " agent",
                (true, _) => " agents",
            };
            details.push(format!("{count}{noun} {verb} {what}"));
        }
        let details = if self.agents.is_empty() {
            "there are no agents".to_owned()
        } else if details.is_empty() {
            "no agent is feasible".to_owned()
        } else {
            details.join(", ")
        };

        let replicas = self.request.replicas;
        let reason = if replicas == 1 {
            format!("no agent can run 1 replica of this service: {details}")
        } else {
            format!(
                "no agent can run replica {} of {replicas} of this service ({replica} of {replicas} could be placed): \
                 {details}",
                replica + 1
            )
        };
        NoPlacement { reason }
    }
}

/// Agents that lack one resource, for the reason of a [`NoPlacement`].
#[derive(Default)]
struct Shortfall {
    count: u32,
    most_free: u64,
    unreported: u32,
}

impl Shortfall {
    fn add(&mut self, free: u64, unreported: bool) {
        self.count += 1;
        self.most_free = self.most_free.max(free);
        if unreported {
            self.unreported += 1;
        }
    }

    fn detail(&self, need: String, most_free: String, resource: &str) -> String {
        let mut text = format!("need {need} free, most free is {most_free}");
        match self.unreported {
            0 => {}
            1 => text.push_str(&format!("; 1 reports no {resource} capacity")),
            n => text.push_str(&format!("; {n} report no {resource} capacity")),
        }
        text
    }
}

/// The seed-derived walk over `n` agents: a start and a stride coprime with `n`, so that
/// start, start + stride, ... (mod n) visits every agent exactly once, in an order unrelated to the
/// snapshot's (which is often sorted by id, region or age).
fn walk(seed: u64, n: usize) -> (usize, usize) {
    if n <= 1 {
        return (0, 1);
    }
    let start = (mix(seed) % n as u64) as usize;
    let mut stride = 1 + (mix(seed ^ 0x5851_f42d_4c95_7f2d) % (n as u64 - 1)) as usize;
    while gcd(stride, n) != 1 {
        stride = if stride + 1 == n { 1 } else { stride + 1 };
    }
    (start, stride)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// SplitMix64's finaliser: spreads a seed over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Breaks ties between equally ranked agents: FNV-1a of the id, mixed with the seed, so that equal
/// agents take turns as the seed changes.
fn tie_key(seed: u64, id: &str) -> u64 {
    let hash =
        id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3));
    mix(hash ^ seed)
}

/// The fraction of a resource left free after placing `need`, or None when the agent has not reported
/// it (capacity 0, which is feasible only for a request of 0 and then says nothing about fit).
fn free_fraction(capacity: u64, reserved: u64, need: u64) -> Option<f64> {
    if capacity == 0 {
        return None;
    }
    let used = reserved.saturating_add(need).min(capacity);
    Some(1.0 - used as f64 / capacity as f64)
}

/// Nomad's `ScoreFitBinPack`, normalised to [0, 1]: 1 for a full agent, 0 for an empty one. The
/// exponential favours agents whose resources are used evenly, which strands less capacity than a plain
/// average of the utilisations would.
fn binpack_fit(cpu_free: Option<f64>, memory_free: Option<f64>) -> f64 {
    match (cpu_free, memory_free) {
        (Some(cpu), Some(memory)) => (20.0 - 10f64.powf(cpu) - 10f64.powf(memory)) / 18.0,
        (Some(free), None) | (None, Some(free)) => (10.0 - 10f64.powf(free)) / 9.0,
        (None, None) => 0.0,
    }
}

/// Thousandths of a CPU as CPUs, exactly: "0.5 CPU", "2 CPUs", "1.25 CPUs".
fn cpu_text(millis: u64) -> String {
    let (whole, fraction) = (millis / 1000, millis % 1000);
    let number = if fraction == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{fraction:03}").trim_end_matches('0').to_owned()
    };
    let unit = if millis <= 1000 { "CPU" } else { "CPUs" };
    format!("{number} {unit}")
}

/// Bytes in binary units with one decimal at most: "512 MiB", "1.5 GiB". Rounds up when `up` (a need)
/// and down otherwise (what is free), so a shortfall never prints as "need 600 MiB, most free is 600 MiB".
fn bytes_text(bytes: u64, up: bool) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u128 << (10 * unit);
    let tenths = u128::from(bytes) * 10;
    let tenths = if up { tenths.div_ceil(scale) } else { tenths / scale };
    let text = if tenths % 10 == 0 { format!("{}", tenths / 10) } else { format!("{}.{}", tenths / 10, tenths % 10) };
    format!("{text} {}", UNITS[unit])
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.agents.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn agent(id: &str, cpu_millis: u64, memory_bytes: u64) -> AgentSnapshot {
        AgentSnapshot {
            id: id.into(),
            ready: true,
            labels: BTreeMap::new(),
            capacity: Resources { cpu_millis, memory_bytes },
            reserved: Resources::default(),
            instances: HashMap::new(),
        }
    }

    fn request(replicas: u32, cpu_millis: u64, memory_bytes: u64) -> Request {
        Request {
            service_id: "web".into(),
            resources: Resources { cpu_millis, memory_bytes },
            constraints: BTreeMap::new(),
            replicas,
            exclude: Vec::new(),
            seed: 7,
        }
    }

    fn placed(agents: &[AgentSnapshot], request: &Request) -> Vec<String> {
        match place(agents, request) {
            Ok(placement) => placement.agents,
            Err(err) => panic!("expected a placement: {err}"),
        }
    }

    fn reason(agents: &[AgentSnapshot], request: &Request) -> String {
        match place(agents, request) {
            Ok(placement) => panic!("expected no placement, got {placement}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn not_ready_agents_are_skipped_and_counted() {
        let mut down = agent("down", 4000, 8 * GIB);
        down.ready = false;
        let agents = vec![down.clone(), agent("up", 4000, 8 * GIB)];
        assert_eq!(placed(&agents, &request(1, 500, 512 * MIB)), ["up"]);

        let agents = vec![down.clone(), down];
        assert_eq!(
            reason(&agents, &request(1, 500, 512 * MIB)),
            "no agent can run 1 replica of this service: 2 agents are not ready"
        );
    }

    #[test]
    fn excluded_agents_are_skipped_and_counted() {
        let agents = vec![agent("a", 4000, 8 * GIB), agent("b", 4000, 8 * GIB)];
        let mut req = request(1, 500, 512 * MIB);
        req.exclude = vec!["a".into()];
        for seed in 0..20 {
            req.seed = seed;
            assert_eq!(placed(&agents, &req), ["b"]);
        }

        req.exclude = vec!["b".into(), "a".into()];
        assert_eq!(
            reason(&agents, &req),
            "no agent can run 1 replica of this service: 2 agents are excluded by the request"
        );
    }

    #[test]
    fn constraints_need_every_label_equal() {
        let mut eu = agent("eu", 4000, 8 * GIB);
        eu.labels.insert("region".into(), "eu".into());
        eu.labels.insert("disk".into(), "hdd".into());
        let mut eu_ssd = eu.clone();
        eu_ssd.id = "eu-ssd".into();
        eu_ssd.labels.insert("disk".into(), "ssd".into());
        let mut us = agent("us", 4000, 8 * GIB);
        us.labels.insert("region".into(), "us".into());
        let bare = agent("bare", 4000, 8 * GIB);
        let agents = vec![eu.clone(), us.clone(), bare.clone(), eu_ssd];

        let mut req = request(1, 500, 512 * MIB);
        req.constraints.insert("region".into(), "eu".into());
        req.constraints.insert("disk".into(), "ssd".into());
        for seed in 0..20 {
            req.seed = seed;
            assert_eq!(placed(&agents, &req), ["eu-ssd"]);
        }

        // Constraints are checked in key order, each agent counted under the first it lacks.
        assert_eq!(
            reason(&[eu, us, bare], &req),
            "no agent can run 1 replica of this service: 3 agents lack the label disk=ssd"
        );
        req.constraints.remove("disk");
        assert_eq!(
            reason(&[agent("a", 4000, GIB), agent("b", 4000, GIB)], &req),
            "no agent can run 1 replica of this service: 2 agents lack the label region=eu"
        );
    }

    #[test]
    fn cpu_must_be_free() {
        let mut busy = agent("busy", 4000, 8 * GIB);
        busy.reserved.cpu_millis = 3600;
        let agents = vec![busy.clone(), agent("idle", 1000, 8 * GIB)];
        assert_eq!(placed(&agents, &request(1, 500, 0)), ["idle"]);

        assert_eq!(
            reason(&[busy, agent("small", 250, 8 * GIB)], &request(1, 500, 0)),
            "no agent can run 1 replica of this service: 2 agents lack CPU (need 0.5 CPU free, most free is 0.4 CPU)"
        );
    }

    #[test]
    fn memory_must_be_free() {
        let mut busy = agent("busy", 4000, 8 * GIB);
        busy.reserved.memory_bytes = 8 * GIB - 256 * MIB;
        let agents = vec![busy.clone(), agent("roomy", 4000, GIB)];
        assert_eq!(placed(&agents, &request(1, 0, 512 * MIB)), ["roomy"]);

        assert_eq!(
            reason(&[busy], &request(1, 0, 512 * MIB)),
            "no agent can run 1 replica of this service: 1 agent lacks memory (need 512 MiB free, most free is 256 MiB)"
        );
    }

    #[test]
    fn unreported_capacity_fits_only_a_request_of_zero() {
        let unreported = [agent("unreported", 0, 0)];
        assert_eq!(placed(&unreported, &request(1, 0, 0)), ["unreported"]);
        assert_eq!(
            reason(&unreported, &request(1, 0, 512 * MIB)),
            "no agent can run 1 replica of this service: 1 agent lacks memory (need 512 MiB free, most free is 0 B; \
             1 reports no memory capacity)"
        );
        assert_eq!(
            reason(&unreported, &request(1, 100, 0)),
            "no agent can run 1 replica of this service: 1 agent lacks CPU (need 0.1 CPU free, most free is 0 CPU; \
             1 reports no CPU capacity)"
        );
    }

    #[test]
    fn reason_counts_every_filter() {
        let mut agents = Vec::new();
        for i in 0..3 {
            let mut down = agent(&format!("down-{i}"), 4000, 8 * GIB);
            down.ready = false;
            agents.push(down);
        }
        agents.push(agent("dead", 4000, 8 * GIB));
        let mut us = agent("us", 4000, 8 * GIB);
        us.labels.insert("region".into(), "us".into());
        agents.push(us);
        let mut eu_small = agent("eu-cpu", 1000, 8 * GIB);
        eu_small.labels.insert("region".into(), "eu".into());
        agents.push(eu_small);
        for (i, free) in [128 * MIB, 256 * MIB].into_iter().enumerate() {
            let mut eu = agent(&format!("eu-{i}"), 4000, 8 * GIB);
            eu.labels.insert("region".into(), "eu".into());
            eu.reserved.memory_bytes = 8 * GIB - free;
            agents.push(eu);
        }
        let mut req = request(1, 2000, 512 * MIB);
        req.constraints.insert("region".into(), "eu".into());
        req.exclude = vec!["dead".into()];
        assert_eq!(
            reason(&agents, &req),
            "no agent can run 1 replica of this service: 3 agents are not ready, 1 is excluded by the request, \
             1 lacks the label region=eu, 1 lacks CPU (need 2 CPUs free, most free is 1 CPU), \
             2 lack memory (need 512 MiB free, most free is 256 MiB)"
        );
    }

    #[test]
    fn no_agents_at_all() {
        assert_eq!(reason(&[], &request(1, 500, 0)), "no agent can run 1 replica of this service: there are no agents");
        assert_eq!(
            reason(&[], &request(2, 0, 0)),
            "no agent can run replica 1 of 2 of this service (0 of 2 could be placed): there are no agents"
        );
    }

    #[test]
    fn zero_replicas_is_an_empty_placement() {
        assert_eq!(placed(&[], &request(0, 500, 0)), Vec::<String>::new());
    }

    #[test]
    fn binpack_prefers_the_fuller_agent() {
        let mut half = agent("half", 4000, 8 * GIB);
        half.reserved = Resources { cpu_millis: 2000, memory_bytes: 4 * GIB };
        let mut most = agent("most", 4000, 8 * GIB);
        most.reserved = Resources { cpu_millis: 3000, memory_bytes: 6 * GIB };
        let empty = agent("empty", 4000, 8 * GIB);
        let agents = vec![empty, half, most];
        for seed in 0..20 {
            let mut req = request(1, 500, 512 * MIB);
            req.seed = seed;
            assert_eq!(placed(&agents, &req), ["most"]);
        }
    }

    #[test]
    fn binpack_prefers_even_use_over_one_exhausted_resource() {
        // 50% used on average, but CPU nearly gone: its free memory would be stranded.
        let mut lopsided = agent("lopsided", 4000, 8 * GIB);
        lopsided.reserved = Resources { cpu_millis: 3500, memory_bytes: GIB };
        // 45% used on average, evenly.
        let mut even = agent("even", 4000, 8 * GIB);
        even.reserved = Resources { cpu_millis: 1800, memory_bytes: 8 * GIB * 45 / 100 };
        assert_eq!(placed(&[lopsided, even], &request(1, 0, 0)), ["even"]);
    }

    #[test]
    fn spread_puts_replicas_on_distinct_agents_when_enough_fit() {
        // "full" is the bin-packing favourite and would take every replica without the spread penalty.
        let mut full = agent("full", 8000, 16 * GIB);
        full.reserved = Resources { cpu_millis: 6000, memory_bytes: 12 * GIB };
        let mut down = agent("down", 8000, 16 * GIB);
        down.ready = false;
        let agents = vec![agent("a", 8000, 16 * GIB), full, down, agent("b", 8000, 16 * GIB)];
        for seed in 0..20 {
            let mut req = request(3, 500, 512 * MIB);
            req.seed = seed;
            let mut chosen = placed(&agents, &req);
            assert_eq!(chosen[0], "full");
            chosen.sort();
            assert_eq!(chosen, ["a", "b", "full"]);
        }
    }

    #[test]
    fn spread_counts_instances_already_running() {
        let mut running = agent("running", 8000, 16 * GIB);
        running.reserved = Resources { cpu_millis: 6000, memory_bytes: 12 * GIB };
        running.instances.insert("web".into(), 1);
        running.instances.insert("db".into(), 3);
        let agents = vec![running, agent("idle", 8000, 16 * GIB)];
        assert_eq!(placed(&agents, &request(1, 500, 512 * MIB)), ["idle"]);
    }

    #[test]
    fn spread_shares_agents_when_too_few_fit() {
        let mut tiny = agent("tiny", 100, 16 * GIB);
        tiny.reserved.cpu_millis = 50;
        let mut down = agent("down", 8000, 16 * GIB);
        down.ready = false;
        let agents = vec![tiny, agent("only", 8000, 16 * GIB), down];
        assert_eq!(placed(&agents, &request(3, 500, 512 * MIB)), ["only", "only", "only"]);

        let agents = vec![agent("x", 8000, 16 * GIB), agent("y", 8000, 16 * GIB)];
        let mut chosen = placed(&agents, &request(3, 500, 512 * MIB));
        chosen.sort();
        assert!(chosen == ["x", "x", "y"] || chosen == ["x", "y", "y"], "{chosen:?}");
    }

    #[test]
    fn reservations_accumulate_across_replicas() {
        let mut only = agent("only", 8000, 4 * GIB);
        only.reserved.memory_bytes = 3 * GIB;
        assert_eq!(placed(&[only.clone()], &request(1, 0, 600 * MIB)), ["only"]);
        assert_eq!(
            reason(&[only], &request(2, 0, 600 * MIB)),
            "no agent can run replica 2 of 2 of this service (1 of 2 could be placed): \
             1 agent lacks memory (need 600 MiB free, most free is 424 MiB)"
        );
    }

    #[test]
    fn same_seed_same_placement() {
        let agents: Vec<_> = (0..200).map(|i| agent(&format!("agent-{i:03}"), 4000, 8 * GIB)).collect();
        let mut req = request(3, 500, 512 * MIB);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            req.seed = seed;
            let first = placed(&agents, &req);
            assert_eq!(placed(&agents, &req), first);
            seen.insert(first);
        }
        // Equal agents take turns as the seed changes.
        assert!(seen.len() > 40, "only {} distinct placements", seen.len());
    }

    #[test]
    fn sampling_never_misses_the_one_feasible_agent() {
        let mut agents: Vec<_> = (0..10_000)
            .map(|i| {
                let mut agent = agent(&format!("agent-{i:05}"), 4000, 8 * GIB);
                agent.reserved.memory_bytes = 8 * GIB - 100 * MIB;
                agent
            })
            .collect();
        agents[6789].reserved.memory_bytes = 0;
        for seed in 0..20 {
            let mut req = request(1, 500, 512 * MIB);
            req.seed = seed;
            assert_eq!(placed(&agents, &req), ["agent-06789"]);
        }
        agents[6789].ready = false;
        assert_eq!(
            reason(&agents, &request(1, 500, 512 * MIB)),
            "no agent can run 1 replica of this service: 1 agent is not ready, \
             9999 lack memory (need 512 MiB free, most free is 100 MiB)"
        );
    }

    #[test]
    fn walk_visits_every_agent_once() {
        for n in [1, 2, 3, 4, 12, 97, 100, 1024] {
            for seed in 0..10 {
                let (start, stride) = walk(seed, n);
                let mut seen = vec![false; n];
                let mut index = start;
                for _ in 0..n {
                    assert!(!seen[index], "n={n} seed={seed}");
                    seen[index] = true;
                    index = (index + stride) % n;
                }
            }
        }
    }

    #[test]
    fn sampling_scores_a_bounded_number_of_agents() {
        // 64 feasible agents, each fuller than the one before: a full scan would always pick the last.
        let agents: Vec<_> = (0..64)
            .map(|i| {
                let mut agent = agent(&format!("agent-{i:02}"), 4000, 8 * GIB);
                agent.reserved.cpu_millis = i * 50;
                agent
            })
            .collect();
        let picks: Vec<u64> = (0..40)
            .map(|seed| {
                let mut req = request(1, 500, 0);
                req.seed = seed;
                placed(&agents, &req)[0]["agent-".len()..].parse().unwrap()
            })
            .collect();
        assert!(picks.iter().any(|&pick| pick != 63), "every placement scored every agent");
        // The best of 16 is in the top quarter with probability 1 - 0.75^16 = 99%.
        let top_quarter = picks.iter().filter(|&&pick| pick >= 48).count();
        assert!(top_quarter >= 30, "{picks:?}");
    }

    #[test]
    fn units_read_as_a_person_would() {
        assert_eq!(cpu_text(500), "0.5 CPU");
        assert_eq!(cpu_text(1000), "1 CPU");
        assert_eq!(cpu_text(1250), "1.25 CPUs");
        assert_eq!(cpu_text(2000), "2 CPUs");
        assert_eq!(bytes_text(512, false), "512 B");
        assert_eq!(bytes_text(512 * MIB, true), "512 MiB");
        assert_eq!(bytes_text(3 * GIB / 2, false), "1.5 GiB");
        assert_eq!(bytes_text(600 * MIB - 1, false), "599.9 MiB");
        assert_eq!(bytes_text(600 * MIB + 1, true), "600.1 MiB");
    }
}
