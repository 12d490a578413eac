// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state replay a subscriber receives first: a [`Snapshot`] of the
//! IOMMU taken when it registered, encoded as EVENT messages (`seq` 0) a
//! chunk at a time as its socket drains, then REPLAY_DONE.
//!
//! The snapshot shares the mapping leaves copy-on-write with the live
//! model, so replaying a domain of 200k mappings neither copies them up
//! front nor holds any lock while it is written; changes made after the
//! snapshot reach the client as live events, queued behind the replay.

use viommu::{device::Snapshot, StateChange};
use viommu_protocol::{
    messages::{Event, ReplayDone},
    Message,
};

/// Where the replay stands.
enum Step {
    Bypass,
    /// Domain `i`: its endpoints from `endpoint`.
    Endpoints {
        i: usize,
        endpoint: usize,
    },
    /// Domain `i`: its mappings from IOVA `from`.
    Mappings {
        i: usize,
        from: u64,
    },
    Done,
}

/// A replay in progress.
pub(crate) struct Replay {
    snapshot: Snapshot,
    step: Step,
}

impl Replay {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        Replay {
            snapshot,
            step: Step::Bypass,
        }
    }

    /// Appends events to `out` until it holds at least `max` bytes or the
    /// replay is complete (REPLAY_DONE appended); true when complete.
    pub(crate) fn next_chunk(&mut self, out: &mut Vec<u8>, max: usize) -> bool {
        let event = |out: &mut Vec<u8>, change| {
            Message::from(Event { seq: 0, change }).encode_into(out);
        };
        while out.len() < max {
            match self.step {
                Step::Bypass => {
                    event(out, StateChange::Bypass(self.snapshot.bypass));
                    self.step = Step::Endpoints { i: 0, endpoint: 0 };
                }
                Step::Endpoints { i, endpoint } => {
                    let Some((id, d)) = self.snapshot.domains.get(i) else {
                        Message::from(ReplayDone {}).encode_into(out);
                        self.step = Step::Done;
                        continue;
                    };
                    match d.endpoints.get(endpoint) {
                        Some(&ep) => {
                            event(
                                out,
                                StateChange::Attach {
                                    endpoint: ep,
                                    domain: *id,
                                    bypass: d.bypass,
                                },
                            );
                            self.step = Step::Endpoints {
                                i,
                                endpoint: endpoint + 1,
                            };
                        }
                        None => self.step = Step::Mappings { i, from: 0 },
                    }
                }
                Step::Mappings { i, from } => {
                    let (id, d) = &self.snapshot.domains[i];
                    let mut next = None;
                    for mapping in d.mappings.iter_from(from) {
                        if out.len() >= max {
                            next = Some(mapping.virt_start);
                            break;
                        }
                        event(
                            out,
                            StateChange::Map {
                                domain: *id,
                                mapping,
                            },
                        );
                    }
                    self.step = match next {
                        Some(from) => Step::Mappings { i, from },
                        None => Step::Endpoints {
                            i: i + 1,
                            endpoint: 0,
                        },
                    };
                }
                Step::Done => return true,
            }
        }
        matches!(self.step, Step::Done)
    }
}
