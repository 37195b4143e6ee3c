use super::*;
use crate::api::StoragePoolSummary;
use crate::libvirt::fake::FakeLibvirt;

fn pool(name: &str) -> StoragePoolSummary {
    StoragePoolSummary {
        name: name.into(),
        type_: "dir".into(),
        path: Some(format!("/pools/{name}")),
        capacity: 1,
        allocation: 0,
        available: 1,
        active: true,
    }
}

fn listings(virt: &FakeLibvirt) -> usize {
    virt.calls()
        .iter()
        .filter(|c| *c == "list storage pools")
        .count()
}

#[tokio::test]
async fn a_second_caller_gets_the_copy() {
    let virt = FakeLibvirt::default().with_pool(pool("a"));
    let (_tx, rx) = broadcast::channel(8);
    let index = PoolIndex::new(rx);
    let (first, kept) = index.get(&virt).await.unwrap();
    assert!(!kept);
    let (second, kept) = index.get(&virt).await.unwrap();
    assert!(kept);
    assert_eq!(first, second);
    assert_eq!(second[0].path.as_deref(), Some("/pools/a"));
    assert_eq!(listings(&virt), 1);
}

#[tokio::test]
async fn pool_events_reconnects_and_lag_drop_the_copy() {
    let virt = FakeLibvirt::default().with_pool(pool("a"));
    let (tx, rx) = broadcast::channel(2);
    let index = PoolIndex::new(rx);
    index.get(&virt).await.unwrap();
    let domain = Event::Domain {
        name: "vm".into(),
        kind: crate::libvirt::DomainEvent::Lifecycle(crate::libvirt::Lifecycle::Started),
    };
    tx.send(domain).unwrap();
    assert!(
        index.get(&virt).await.unwrap().1,
        "a domain event changes no pool"
    );
    for ev in [
        Event::StoragePool { name: "b".into() },
        Event::Connected,
        Event::Closed,
    ] {
        tx.send(ev).unwrap();
        assert!(!index.get(&virt).await.unwrap().1);
        assert!(index.get(&virt).await.unwrap().1);
    }
    // More events than the receiver holds: some were lost, so nothing kept is trusted.
    for _ in 0..3 {
        tx.send(Event::Network { name: "n".into() }).unwrap();
    }
    assert!(!index.get(&virt).await.unwrap().1);
    assert_eq!(listings(&virt), 5);
}

#[tokio::test]
async fn forget_and_fresh_read_again() {
    let virt = FakeLibvirt::default().with_pool(pool("a"));
    let (_tx, rx) = broadcast::channel(8);
    let index = PoolIndex::new(rx);
    index.get(&virt).await.unwrap();
    index.forget();
    assert!(!index.get(&virt).await.unwrap().1);
    index.fresh(&virt).await.unwrap();
    assert!(index.get(&virt).await.unwrap().1);
    assert_eq!(listings(&virt), 3);
}

#[test]
fn a_read_that_raced_with_an_event_is_not_kept() {
    let (tx, rx) = broadcast::channel(8);
    let mut state = State {
        events: rx,
        kept: None,
        generation: 0,
    };
    let now = Instant::now();
    let started = state.generation;
    // The pool changes while the listing is on its way.
    tx.send(Event::StoragePool { name: "a".into() }).unwrap();
    state.keep(started, now, Arc::new(Vec::new()));
    assert!(state.current(now).is_none());
    // A read without an event in between is kept, until it is too old.
    let started = state.generation;
    state.keep(started, now, Arc::new(Vec::new()));
    assert!(state.current(now).is_some());
    assert!(state.current(now + MAX_AGE).is_none());
}

#[test]
fn which_events_invalidate() {
    assert!(invalidates(&Ok(Event::StoragePool { name: "p".into() })));
    assert!(invalidates(&Ok(Event::Connected)));
    assert!(invalidates(&Ok(Event::Closed)));
    assert!(invalidates(&Err(TryRecvError::Lagged(1))));
    assert!(invalidates(&Err(TryRecvError::Closed)));
    assert!(!invalidates(&Ok(Event::Network { name: "n".into() })));
    assert!(!invalidates(&Err(TryRecvError::Empty)));
}
