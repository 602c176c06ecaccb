//! The cache of the resident's last `/state` and `/state_ids` answers (held by `http::Services`, filled and read by
//! `federation_api`): a joiner asks for both at the same event.

use crate::store::ids::{EventNid, StateGroup};

/// State entries as (event nid, event id), and auth chain nids (minus the state itself).
pub struct StateAnswer {
    pub state: Vec<(EventNid, String)>,
    pub chain: Vec<(EventNid, String)>,
}

/// The last few `/state` and `/state_ids` answers' state and auth chain, by room and state group: a joiner asks
/// for both at the same event, and at 100k members each costs the state group's 100k entries and their auth
/// chain. A state group never changes; the room id is in the key since a purged room's group numbers can come
/// back, and entries live [`StateAnswers::TTL`] only, so at most [`StateAnswers::MAX`] answers' ids are held.
#[derive(Default)]
pub struct StateAnswers {
    entries: std::sync::Mutex<Vec<StateAnswerEntry>>,
}

/// Room id, state group, when, answer.
type StateAnswerEntry = (String, StateGroup, std::time::Instant, std::sync::Arc<StateAnswer>);

impl StateAnswers {
    const MAX: usize = 2;
    const TTL: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn get(&self, room_id: &str, sg: StateGroup) -> Option<std::sync::Arc<StateAnswer>> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| x.2.elapsed() < Self::TTL);
        e.iter().find(|x| x.0 == room_id && x.1 == sg).map(|x| x.3.clone())
    }

    pub fn put(&self, room_id: &str, sg: StateGroup, a: std::sync::Arc<StateAnswer>) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !(x.0 == room_id && x.1 == sg));
        if e.len() >= Self::MAX {
            e.remove(0);
        }
        e.push((room_id.to_owned(), sg, std::time::Instant::now(), a));
    }
}
