//! The problems of one pass against the last: a problem is logged when it appears and
//! said cleared when it no longer holds; none is kept after that (a set that only grows
//! would hide a problem that comes back, and never shrink).

use std::collections::BTreeSet;

/// What went wrong in the last pass, and what so far in this one.
#[derive(Debug, Default)]
pub struct Problems {
    last: BTreeSet<String>,
    now: BTreeSet<String>,
}

impl Problems {
    /// `problem` holds in this pass; true when it is new (not in the last pass, not
    /// noted yet in this one): the caller logs it then.
    pub fn note(&mut self, problem: impl Into<String>) -> bool {
        let problem = problem.into();
        let new = !self.last.contains(&problem) && !self.now.contains(&problem);
        self.now.insert(problem);
        new
    }

    /// The pass is over: the problems of the last pass that no longer hold (to be said
    /// cleared). This pass's become the last.
    pub fn settle(&mut self) -> Vec<String> {
        let now = std::mem::take(&mut self.now);
        let cleared = self.last.difference(&now).cloned().collect();
        self.last = now;
        cleared
    }

    /// The problems of the last pass.
    pub fn held(&self) -> impl Iterator<Item = &str> {
        self.last.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_new_once_cleared_when_gone_and_new_again_if_it_comes_back() {
        let mut p = Problems::default();
        assert!(p.note("no VIP for web"));
        assert!(!p.note("no VIP for web"), "twice in one pass: said once");
        assert!(p.settle().is_empty());
        assert!(!p.note("no VIP for web"), "still there: not said again");
        assert!(p.note("label refused"));
        assert!(p.settle().is_empty());
        assert_eq!(p.held().collect::<Vec<_>>(), ["label refused", "no VIP for web"]);

        p.note("label refused");
        assert_eq!(p.settle(), ["no VIP for web"], "cleared");
        assert_eq!(
            p.held().collect::<Vec<_>>(),
            ["label refused"],
            "nothing stale kept"
        );
        assert!(p.note("no VIP for web"), "back: said again");
        p.settle();
        assert_eq!(
            p.settle(),
            ["no VIP for web"],
            "a pass with no problem clears all"
        );
        assert_eq!(p.held().count(), 0);
    }
}
