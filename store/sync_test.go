package store

import (
	"bytes"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// An fsync issued while another one is syncing the database's logs
// returns only after that sync did: the first found the marker of a chunk
// committed in the background unsynced and lowered the flag, so the second
// finds nothing to do, yet the marker is not durable until the first's
// sync returns. Here the first sync is held at a hook; the second must not
// return while it is held. Under the race detector this also checks the
// flag and the hook are used under proper locks.
//
// The second fsync's early return is what the test looks for while the
// first is held: without the fix it returns at once, and the test waits
// for it up to a deadline; with the fix it cannot return then, and the
// test lets the first go when the deadline passes. A loaded machine can
// only make the test miss a bug, never fail a correct build.
func TestConcurrentSyncWaits(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := s.OpenCache(overlay.Digest{11}, 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: 3}, bytes.Repeat([]byte{5}, 4096)); err != nil {
		t.Fatal(err)
	}
	// What the committer does every second: the marker goes in, unsynced.
	if err := c.commit(); err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	first := true
	c.syncHook = func() {
		if first {
			first = false
			close(held)
			<-release
		}
	}
	aDone := make(chan error, 1)
	go func() { aDone <- c.Sync() }()
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the first fsync never synced the logs")
	}
	bDone := make(chan error, 1)
	go func() { bDone <- c.Sync() }()
	select {
	case err := <-bDone:
		close(release)
		<-aDone
		t.Fatalf("the second fsync returned (%v) while the first was still syncing the marker it found", err)
	case <-time.After(time.Second):
	}
	close(release)
	for name, ch := range map[string]chan error{"first": aDone, "second": bDone} {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("%s fsync: %v", name, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("the %s fsync never returned", name)
		}
	}
}
