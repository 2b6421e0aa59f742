//! Draft trees: the data structure, EAGLE-2 reranking, and EAGLE-1 static shapes.
//!
//! Invariants:
//! - Node 0 is the root (the last committed token, not yet run through the target); every
//!   other node's parent comes before it, so a prefix of the node list is always a tree and
//!   `Visibility::tree` can be built in one pass.
//! - A node's verification position is `prefix_len + depth`.
//! - Reranking keeps the best-scoring nodes, and because a child's cumulative log-probability
//!   never exceeds its parent's (ties broken by creation order), the kept set is connected.
//!
//! From EAGLE-2 (Li et al., "Dynamic Draft Trees", 2024, arXiv:2406.16858): expand the top-k
//! frontier by cumulative draft log-probability, then rerank all scored nodes and keep the
//! best `total_token - 1`.

/// A draft tree ready for verification.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    /// parents[0] = -1; otherwise the index of the parent node.
    pub parents: Vec<i32>,
    pub depths: Vec<usize>,
    /// Per node, the draft distribution its children were drawn from, in sampling mode (the
    /// children then appear in draw order). `None` for leaves and in greedy mode.
    pub draft_probs: Vec<Option<Vec<f32>>>,
}

impl DraftTree {
    /// A tree with only a root.
    pub fn root(token: u32) -> Self {
        DraftTree {
            tokens: vec![token],
            parents: vec![-1],
            depths: vec![0],
            draft_probs: vec![None],
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends a child of `parent`; returns its index.
    pub fn push(&mut self, parent: usize, token: u32) -> usize {
        assert!(parent < self.len());
        self.tokens.push(token);
        self.parents.push(parent as i32);
        self.depths.push(self.depths[parent] + 1);
        self.draft_probs.push(None);
        self.len() - 1
    }

    /// Children of every node, in node order.
    pub fn children(&self) -> Vec<Vec<usize>> {
        let mut ch = vec![Vec::new(); self.len()];
        for (i, &p) in self.parents.iter().enumerate().skip(1) {
            ch[p as usize].push(i);
        }
        ch
    }

    /// Verification positions for a target prefix of `prefix_len` tokens.
    /// The root and, `len - 1` times, the first child of the last node: the draft's own best
    /// continuation (children are pushed best first).
    pub fn best_chain(&self, len: usize) -> Vec<usize> {
        let children = self.children();
        let mut chain = vec![0];
        while chain.len() < len {
            match children[*chain.last().unwrap()].first() {
                Some(&c) => chain.push(c),
                None => break,
            }
        }
        chain
    }

    pub fn positions(&self, prefix_len: usize) -> Vec<usize> {
        self.depths.iter().map(|d| prefix_len + d).collect()
    }

    pub fn max_depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// Checks the structural invariants; used by tests and debug assertions.
    pub fn check(&self) -> Result<(), String> {
        let n = self.len();
        if n == 0 || self.parents[0] != -1 || self.depths[0] != 0 {
            return Err("node 0 must be the root".into());
        }
        if self.parents.len() != n || self.depths.len() != n || self.draft_probs.len() != n {
            return Err("ragged tree".into());
        }
        for i in 1..n {
            let p = self.parents[i];
            if p < 0 || p as usize >= i {
                return Err(format!(
                    "node {i} has parent {p}, which does not precede it"
                ));
            }
            if self.depths[i] != self.depths[p as usize] + 1 {
                return Err(format!("node {i} has the wrong depth"));
            }
        }
        Ok(())
    }
}

/// A scored draft candidate before reranking.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub token: u32,
    /// Index into the candidate list, or `None` for a child of the root.
    pub parent: Option<usize>,
    /// Cumulative draft log-probability along the path from the root.
    pub score: f32,
}

/// EAGLE-2 reranking: keeps the `keep` best candidates (score descending, creation order among
/// equals) and returns the tree they form under `root`. A child never outscores its parent, so
/// every kept candidate's parent is kept too.
pub fn rerank(root: u32, cands: &[Candidate], keep: usize) -> DraftTree {
    let order = ranked(cands);
    let mut chosen: Vec<usize> = order.into_iter().take(keep).collect();
    chosen.sort_unstable();
    let mut tree = DraftTree::root(root);
    let mut index_of = vec![usize::MAX; cands.len()];
    for c in chosen {
        let parent = match cands[c].parent {
            None => 0,
            Some(p) => {
                let t = index_of[p];
                assert!(t != usize::MAX, "rerank kept a node without its parent");
                t
            }
        };
        index_of[c] = tree.push(parent, cands[c].token);
    }
    tree
}

/// Candidate indices, best first.
pub fn ranked(cands: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| cands[b].score.total_cmp(&cands[a].score).then(a.cmp(&b)));
    order
}

/// An EAGLE-1 style static tree: each path is a list of ranks (0 = the draft's best token) from
/// the root; the set is prefix-closed.
#[derive(Clone, Debug, PartialEq)]
pub struct StaticShape {
    pub paths: Vec<Vec<usize>>,
}

impl StaticShape {
    /// The `n` most promising paths of depth at most `max_depth`, scoring a path by the product
    /// of a typical acceptance rate per rank (0.6, 0.15, 0.07, 0.04, 0.02, ...). Children always
    /// score below their parents, so the set is prefix-closed.
    pub fn default_with(n: usize, max_depth: usize, max_rank: usize) -> Self {
        let rate = |r: usize| {
            [0.6f64, 0.15, 0.07, 0.04, 0.02][r.min(4)] / (1 + r.saturating_sub(4)) as f64
        };
        let mut paths: Vec<(f64, Vec<usize>)> = Vec::new();
        let mut frontier: Vec<(f64, Vec<usize>)> =
            (0..max_rank).map(|r| (rate(r), vec![r])).collect();
        while paths.len() < n && !frontier.is_empty() {
            let best = (0..frontier.len())
                .max_by(|&a, &b| frontier[a].0.total_cmp(&frontier[b].0).then(b.cmp(&a)))
                .unwrap();
            let (s, p) = frontier.swap_remove(best);
            if p.len() < max_depth {
                for r in 0..max_rank {
                    let mut c = p.clone();
                    c.push(r);
                    frontier.push((s * rate(r), c));
                }
            }
            paths.push((s, p));
        }
        let mut paths: Vec<Vec<usize>> = paths.into_iter().map(|(_, p)| p).collect();
        paths.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
        StaticShape { paths }
    }

    /// Number of children each path (identified by its ranks) has: the highest child rank + 1.
    pub fn branching(&self, prefix: &[usize]) -> usize {
        self.paths
            .iter()
            .filter(|p| p.len() == prefix.len() + 1 && p[..prefix.len()] == *prefix)
            .map(|p| p[prefix.len()] + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn max_depth(&self) -> usize {
        self.paths.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    pub fn check(&self) -> Result<(), String> {
        for p in &self.paths {
            if p.is_empty() {
                return Err("empty path".into());
            }
            if p.len() > 1 && !self.paths.contains(&p[..p.len() - 1].to_vec()) {
                return Err(format!("path {p:?} lacks its parent"));
            }
            let last = p[p.len() - 1];
            for r in 0..last {
                let mut s = p[..p.len() - 1].to_vec();
                s.push(r);
                if !self.paths.contains(&s) {
                    return Err(format!("path {p:?} lacks its elder sibling {s:?}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(token: u32, parent: Option<usize>, score: f32) -> Candidate {
        Candidate {
            token,
            parent,
            score,
        }
    }

    #[test]
    fn rerank_keeps_a_connected_tree_with_depths_and_parents() {
        // Root children a(-0.1), b(-1.0); a's children c(-0.3), d(-2.0); c's child e(-0.35).
        let cands = vec![
            cand(10, None, -0.1),
            cand(11, None, -1.0),
            cand(12, Some(0), -0.3),
            cand(13, Some(0), -2.0),
            cand(14, Some(2), -0.35),
        ];
        let t = rerank(7, &cands, 3);
        t.check().unwrap();
        assert_eq!(t.tokens, vec![7, 10, 12, 14]);
        assert_eq!(t.parents, vec![-1, 0, 1, 2]);
        assert_eq!(t.depths, vec![0, 1, 2, 3]);
        assert_eq!(t.positions(20), vec![20, 21, 22, 23]);
        let t = rerank(7, &cands, 4);
        assert_eq!(t.tokens, vec![7, 10, 11, 12, 14]);
        assert_eq!(t.parents, vec![-1, 0, 0, 1, 3]);
        assert_eq!(t.children()[0], vec![1, 2]);
    }

    #[test]
    fn rerank_with_ties_keeps_parents() {
        // A child with log-prob 0 ties its parent; creation order puts the parent first.
        let cands = vec![
            cand(1, None, -0.5),
            cand(2, None, -0.5),
            cand(3, Some(1), -0.5),
        ];
        let t = rerank(0, &cands, 2);
        assert_eq!(t.tokens, vec![0, 1, 2]);
        t.check().unwrap();
    }

    #[test]
    fn static_shape_is_prefix_closed() {
        let s = StaticShape::default_with(25, 6, 4);
        assert_eq!(s.paths.len(), 25);
        s.check().unwrap();
        assert_eq!(s.paths[0], vec![0]);
        assert!(s.max_depth() <= 6);
        assert!(s.branching(&[]) >= 2);
        assert_eq!(s.branching(&[3, 3, 3]), 0);
    }

    #[test]
    fn check_rejects_bad_trees() {
        let mut t = DraftTree::root(1);
        t.push(0, 2);
        t.parents[1] = 1;
        assert!(t.check().is_err());
    }
}
