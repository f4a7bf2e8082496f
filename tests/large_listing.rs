//! A namespace too large for one `Images.List` answer, on real containerd 1.6, 1.7 and 2.x.
//!
//! containerd sends 16 MiB at most (about 50,000 records with K3s's labels) and answers
//! `ResourceExhausted` beyond; pinkeeper then lists in parts (src/containerd/parts.rs). Here
//! containerd's limit is lowered to 32 KiB so that 600 records are too many, and some parts
//! too, which must be split again.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use containerd_client::types::Descriptor;
use pinkeeper_testkit::{Containerd, Options, Version, CRI_PIN_LABEL, K3S_PIN_LABEL, PINNED};

const NAMESPACE: &str = "listing";
const RECORDS: usize = 600;
const LIMIT: usize = 32 << 10;

on_every_version!(lists_a_namespace_too_large_for_one_answer);

async fn lists_a_namespace_too_large_for_one_answer(version: Version) -> Result<()> {
    let options = Options {
        max_send_message_size: Some(LIMIT),
        ..Options::default()
    };
    let containerd = Containerd::start_with(version, options).await?;
    let client = containerd.client(NAMESPACE).await?;
    let pins = BTreeMap::from([
        (K3S_PIN_LABEL.to_string(), PINNED.to_string()),
        (CRI_PIN_LABEL.to_string(), PINNED.to_string()),
    ]);
    let mut expected = BTreeMap::new();
    for i in 0..RECORDS {
        let digest = format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15 + 1);
        // Tags, digest aliases and odd last characters, so that every class is used.
        let name = match i % 4 {
            0 => format!("docker.io/library/app-{i}:1.{i}"),
            1 => format!("docker.io/library/app-{i}@{digest}"),
            2 => format!("registry.local/team/web:v{i}-RC"),
            _ => format!("registry.local/team/web:{i}_x-"),
        };
        let target = Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest.clone(),
            size: 1,
            ..Default::default()
        };
        client.create_image(&name, target, &pins).await?;
        expected.insert(name, digest);
    }
    let whole = client.list(&[]).await;
    ensure!(
        whole.as_ref().err().map(|s| s.code()) == Some(tonic::Code::ResourceExhausted),
        "containerd answered one listing of {RECORDS} records despite a {LIMIT}-byte limit: {:?}",
        whole.map(|images| images.len())
    );

    let store = pinkeeper::containerd::Containerd::connect(containerd.socket(), NAMESPACE)
        .await
        .context("connecting pinkeeper's client")?;
    let listed = store.list().await.context("pinkeeper's listing")?;
    let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
    let want: Vec<&str> = expected.keys().map(String::as_str).collect();
    ensure!(
        names == want,
        "listed {} records, {} expected, in name order",
        names.len(),
        want.len()
    );
    for record in &listed {
        ensure!(record.digest.as_ref() == expected.get(&record.name));
        ensure!(
            record.labels.iter().eq(pins.iter()),
            "{}: {:?}",
            record.name,
            record.labels
        );
    }
    Ok(())
}
