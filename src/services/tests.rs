use super::*;
use crate::store::memory::MemoryKv;
use crate::store::Keys;

fn name(n: &str) -> ServiceName {
    ServiceName::new(n).unwrap()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vipd-defs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn settings(publish: &[&str], scheduler: Option<&str>) -> Settings {
    Settings {
        publish: (!publish.is_empty()).then(|| publish.iter().map(|s| (*s).to_owned()).collect()),
        scheduler: scheduler.map(str::to_owned),
        ..Settings::default()
    }
}

/// create, update, rm, ls with their refusals, over any store.
async fn lifecycle(store: &dyn DefinitionStore) {
    let web = create(store, name("web"), &settings(&["8080:80"], None))
        .await
        .unwrap();
    assert_eq!(web.publish.len(), 1);
    assert!(matches!(
        create(store, name("web"), &Settings::default()).await,
        Err(DefinitionError::Exists(_))
    ));
    // Only the settings given change.
    let up = update(store, &name("web"), &settings(&[], Some("wrr")))
        .await
        .unwrap();
    assert_eq!(
        (up.scheduler.name(), up.publish.clone()),
        ("wrr", web.publish.clone())
    );
    assert_eq!(store.get(&name("web")).await.unwrap(), Some(up));
    let e = update(store, &name("api"), &Settings::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, DefinitionError::Missing(_)) && e.is_bad_input(),
        "{e}"
    );
    let e = update(store, &name("web"), &settings(&["80"], None))
        .await
        .unwrap_err();
    assert!(
        e.is_bad_input() && e.to_string().starts_with("--publish \"80\""),
        "{e}"
    );
    assert_eq!(store.list().await.unwrap().len(), 1);
    remove(store, &name("web")).await.unwrap();
    assert!(matches!(
        remove(store, &name("web")).await,
        Err(DefinitionError::Missing(_))
    ));
    assert!(store.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_file_store_creates_updates_and_removes_with_clear_refusals() {
    let dir = tempdir("file");
    lifecycle(&FileDefinitions::new(&dir)).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_cluster_store_creates_updates_and_removes_with_clear_refusals() {
    let cluster = Cluster::new(Arc::new(MemoryKv::new()), Keys::default());
    lifecycle(&cluster).await;
}

#[tokio::test]
async fn a_stale_update_is_refused_by_both_stores() {
    let dir = tempdir("stale");
    let file = FileDefinitions::new(&dir);
    let cluster = Cluster::new(Arc::new(MemoryKv::new()), Keys::default());
    for store in [&file as &dyn DefinitionStore, &cluster] {
        let first = create(store, name("web"), &Settings::default()).await.unwrap();
        let mut other = first.clone();
        other.set_scheduler("lc").unwrap();
        assert!(store.put(&other, Some(&first)).await.unwrap());
        // Computed from `first`, which is no longer what is stored: nothing written.
        let mut stale = first.clone();
        stale.set_scheduler("sh").unwrap();
        assert!(!store.put(&stale, Some(&first)).await.unwrap());
        assert_eq!(store.get(&name("web")).await.unwrap(), Some(other));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_cluster_snapshot_carries_the_definitions() {
    let kv = Arc::new(MemoryKv::new());
    let cluster = Cluster::new(kv.clone(), Keys::default());
    create(&cluster, name("web"), &settings(&["8080:80"], Some("wrr")))
        .await
        .unwrap();
    let state = cluster.state().await.unwrap();
    assert!(state.unreadable.is_empty(), "{:?}", state.unreadable);
    assert_eq!(state.definitions[&name("web")].scheduler.name(), "wrr");
    assert_eq!(cluster.definitions().await.unwrap(), state.definitions);
    let before = crate::store::ClusterState::default();
    assert_eq!(before.diff(&state).definitions.added, [name("web")]);
}

#[test]
fn the_file_source_reads_again_only_when_the_file_changed() {
    let dir = tempdir("source");
    let file = FileDefinitions::new(&dir);
    assert!(file.definitions().unwrap().is_empty(), "no file: none");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(create(&file, name("web"), &Settings::default()))
        .unwrap();
    let first = file.definitions().unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        Arc::ptr_eq(&first, &file.definitions().unwrap()),
        "unchanged: cached"
    );
    rt.block_on(create(&file, name("api"), &Settings::default()))
        .unwrap();
    assert_eq!(file.definitions().unwrap().len(), 2);
    // A file edited into nonsense is an error naming it (the agent keeps the last read).
    std::fs::write(file.file(), "[{\"name\": \"web\"}").unwrap();
    let e = file.definitions().unwrap_err().to_string();
    assert!(e.contains("services.json is not a valid services file"), "{e}");
    std::fs::write(
        file.file(),
        r#"[{"name":"web","endpoint_mode":"anycast","scheduler":"rr"}]"#,
    )
    .unwrap();
    let e = file.load().unwrap_err().to_string();
    assert!(
        e.contains("--endpoint-mode \"anycast\": expected vip or dnsrr"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ls_prints_one_row_per_service() {
    let mut web = ServiceDefinition::new(name("web"));
    web.set_publish(&["8080:80", "53:53/udp"]).unwrap();
    web.set_ports(&["http=80"]).unwrap();
    let defs = Definitions::from([
        (name("web"), web),
        (name("db"), ServiceDefinition::new(name("db"))),
    ]);
    let text = render(&defs);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("SERVICE "), "{text}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["db", "vip", "rr", "-", "-"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["web", "vip", "rr", "8080:80/tcp,53:53/udp", "http=80/tcp"]
    );
    assert_eq!(render(&Definitions::new()), "no services defined\n");
}
