//! Property tests of the wire conversions: whatever a peer sends, converting it from the wire
//! never panics, and what it accepts satisfies the engine's invariants; what a service sends
//! comes back unchanged.

use candle_core::{Device, Tensor};
use eagle_engine::tree::DraftTree;
use eagle_proto::common::{self, NodeDistribution};
use eagle_proto::wire::*;
use proptest::prelude::*;
use tonic::Code;

const VOCAB: usize = 50;

fn any_distribution(n: usize) -> impl Strategy<Value = NodeDistribution> {
    (
        0..n as u32 + 2,
        prop::collection::vec(0u32..VOCAB as u32 + 5, 0..6),
        prop::collection::vec(
            prop_oneof![Just(0.0f32), 0.0f32..1.0, Just(f32::NAN), Just(-1.0)],
            0..VOCAB + 2,
        ),
        prop_oneof![Just(VOCAB as u32), 0u32..100],
    )
        .prop_map(|(node, ids, probs, vocab)| NodeDistribution {
            node,
            ids,
            probs,
            vocab,
        })
}

/// Any tree message a peer could send, most of them wrong in some way.
fn any_tree() -> impl Strategy<Value = common::Tree> {
    (1usize..12).prop_flat_map(|n| {
        (
            prop::collection::vec(0u32..VOCAB as u32 + 3, n),
            prop::collection::vec(-2i32..n as i32 + 1, n..n + 2),
            prop::collection::vec(any_distribution(n), 0..3),
        )
            .prop_map(|(tokens, parents, draft_probs)| common::Tree {
                tokens,
                parents,
                draft_probs,
            })
    })
}

/// A valid tree with a distribution at some nodes (dense or sparse).
fn valid_tree() -> impl Strategy<Value = DraftTree> {
    (1usize..12).prop_flat_map(|n| {
        (
            prop::collection::vec(0u32..VOCAB as u32, n),
            prop::collection::vec(any::<prop::sample::Index>(), n),
            prop::collection::vec(
                prop::option::of(prop::collection::vec(
                    prop_oneof![3 => Just(0.0f32), 1 => 0.0f32..1.0],
                    VOCAB,
                )),
                n,
            ),
        )
            .prop_map(move |(tokens, picks, draft_probs)| {
                let mut parents = vec![-1i32];
                let mut depths = vec![0usize];
                for (i, pick) in picks.iter().enumerate().skip(1) {
                    let p = pick.index(i);
                    parents.push(p as i32);
                    depths.push(depths[p] + 1);
                }
                DraftTree {
                    tokens,
                    parents,
                    depths,
                    draft_probs,
                }
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_tree_from_a_peer_never_panics(t in any_tree()) {
        match tree_from_wire(&t, VOCAB) {
            Ok(tree) => {
                prop_assert!(tree.check().is_ok());
                prop_assert!(tree.tokens.iter().all(|&x| (x as usize) < VOCAB));
                for q in tree.draft_probs.iter().flatten() {
                    prop_assert_eq!(q.len(), VOCAB);
                    prop_assert!(q.iter().all(|p| p.is_finite() && *p >= 0.0));
                }
            }
            Err(e) => prop_assert_eq!(e.code(), Code::InvalidArgument),
        }
    }

    #[test]
    fn a_tree_comes_back_as_it_was_sent(t in valid_tree()) {
        let back = tree_from_wire(&tree_to_wire(&t), VOCAB).expect("a valid tree");
        prop_assert_eq!(back.tokens, t.tokens);
        prop_assert_eq!(back.parents, t.parents);
        prop_assert_eq!(back.depths, t.depths);
        prop_assert_eq!(back.draft_probs, t.draft_probs);
    }

    #[test]
    fn features_from_a_peer_never_panic(
        rows in 0u32..6,
        hidden in 0u32..10,
        dtype in -1i32..5,
        data in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let f = common::Features { rows, hidden, dtype, data };
        match features_from_wire(&f, 8, &Device::Cpu) {
            Ok(t) => prop_assert_eq!(t.dims2().unwrap(), (rows as usize, 8)),
            Err(e) => prop_assert_eq!(e.code(), Code::InvalidArgument),
        }
    }

    #[test]
    fn f32_features_come_back_bit_for_bit(
        rows in 1usize..5,
        vals in prop::collection::vec(-1e30f32..1e30, 40),
    ) {
        let t = Tensor::from_vec(vals[..rows * 8].to_vec(), (rows, 8), &Device::Cpu).unwrap();
        let back = features_from_wire(&features_to_wire(&t, candle_core::DType::F32).unwrap(), 8, &Device::Cpu).unwrap();
        prop_assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn sampling_and_speculation_settings_never_panic(
        temperature in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), -2.0f32..5.0],
        top_p in prop_oneof![Just(f32::NAN), -1.0f32..2.0],
        top_k in any::<u32>(),
        seed in any::<u64>(),
        total_token in any::<i32>(),
        depth in any::<u32>(),
        tree_top_k in any::<u32>(),
    ) {
        let s = common::SamplingParams { temperature, top_p, top_k, seed };
        match sampling_from_wire(Some(&s)) {
            Ok(p) => prop_assert_eq!(sampling_to_wire(&p), s),
            Err(e) => prop_assert_eq!(e.code(), Code::InvalidArgument),
        }
        let c = common::SpecParams { total_token, depth, top_k: tree_top_k };
        match spec_from_wire(Some(&c)) {
            Ok(cfg) => prop_assert_eq!(spec_to_wire(&cfg), c),
            Err(e) => prop_assert_eq!(e.code(), Code::InvalidArgument),
        }
    }
}
