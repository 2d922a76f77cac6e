package main

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// bigEnv is an env whose VM is large enough for a stream to be under way
// when the daemon is killed: a disk and a memory image of which every
// other chunk differs from the base.
func bigEnv(t *testing.T, diskChunks, memChunks int) *env {
	e := &env{t: t, dir: t.TempDir()}
	e.state = filepath.Join(e.dir, "state-dir")
	rng := rand.New(rand.NewPCG(7, 8))
	random := func(n int) []byte { return randomBytes(rng, n) }
	files := map[string][]byte{"base/state": []byte("base state"), "app/state": []byte("app state"), "app/vm.json": []byte(`{"m":1}`)}
	for name, n := range map[string]int{"disk.img": diskChunks, "memory.img": memChunks} {
		base := random(n * 4096)
		app := bytes.Clone(base)
		for i := 0; i < n; i += 2 {
			copy(app[i*4096:], random(4096))
		}
		files["base/"+name], files["app/"+name] = base, app
	}
	for name, b := range files {
		e.write(name, b)
	}
	return e
}

// slot is one write of the crash test: it never overlaps another, so what
// the disk holds there after a crash is the write or the original bytes.
type slot struct {
	off  int64
	data []byte
}

// writer is the guest: it writes slots through the mount in small batches
// and fsyncs after each; a slot counts as durable once its fsync returned.
type writer struct {
	mu      sync.Mutex
	acked   []slot // fsynced, or seen on the disk after a kill
	fsynced int    // how many of acked were fsynced
	pending []slot // written, not yet fsynced when the daemon died
}

// run writes up to n slots from next on, until an error (the daemon is
// gone) or the quota is used, and returns the error that stopped it. It
// closes reached once killAt fsyncs have returned.
func (w *writer) run(path string, rng *rand.Rand, next *int, n int, size int64, killAt int, reached chan<- struct{}) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	const slotLen = 3000 // spans chunk boundaries
	if killAt == 0 {
		close(reached)
	}
	for acks, end := 0, *next+n; *next < end; {
		batch := 1 + rng.IntN(4)
		var written []slot
		for range batch {
			s := slot{off: int64(*next) * (slotLen + 1), data: make([]byte, slotLen)}
			if s.off+slotLen > size {
				return errors.New("out of slots")
			}
			for i := range s.data {
				s.data[i] = byte(rng.Uint32())
			}
			*next++
			w.mu.Lock()
			w.pending = append(w.pending, s)
			w.mu.Unlock()
			if _, err := f.WriteAt(s.data, s.off); err != nil {
				return err
			}
			written = append(written, s)
		}
		if err := f.Sync(); err != nil {
			return err
		}
		w.mu.Lock()
		w.acked = append(w.acked, written...)
		w.fsynced += len(written)
		w.pending = w.pending[:0]
		w.mu.Unlock()
		if acks++; acks == killAt {
			close(reached)
		}
	}
	return nil
}

// check compares the disk after a crash with what the writer was told was
// durable: every fsynced slot holds its bytes, every slot in flight holds
// its bytes or the original ones chunk by chunk, and everything else the
// original bytes. The writes in flight then count as done, with what the
// disk holds for them.
func (w *writer) check(got, want []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(got) != len(want) {
		return fmt.Errorf("disk is %d bytes, want %d", len(got), len(want))
	}
	exp := bytes.Clone(want)
	for _, s := range w.acked {
		copy(exp[s.off:], s.data)
	}
	for _, s := range w.pending {
		// A chunk of a write that was not fsynced may hold either version.
		for off := s.off; off < s.off+int64(len(s.data)); {
			end := min((off/4096+1)*4096, s.off+int64(len(s.data)))
			if bytes.Equal(got[off:end], s.data[off-s.off:end-s.off]) {
				copy(exp[off:end], got[off:end])
			}
			off = end
		}
	}
	if bytes.Equal(got, exp) {
		// What the writes in flight left is what the disk holds from now
		// on.
		for _, s := range w.pending {
			w.acked = append(w.acked, slot{s.off, bytes.Clone(got[s.off : s.off+int64(len(s.data))])})
		}
		w.pending = nil
		return nil
	}
	i := 0
	for got[i] == exp[i] {
		i++
	}
	// Say what the chunk holds instead, to tell a lost write from a stale
	// or a foreign one.
	c := int64(i) / 4096 * 4096
	end := min(c+4096, int64(len(got)))
	what := "neither the original bytes nor a write"
	if bytes.Equal(got[c:end], want[c:end]) {
		what = "the original bytes"
	}
	for k, s := range w.acked {
		if int64(i) >= s.off && int64(i) < s.off+int64(len(s.data)) {
			what += fmt.Sprintf("; the byte belongs to fsynced write %d of %d at %d", k, len(w.acked), s.off)
			if got[i] == want[i] {
				what += ", which is lost"
			}
		}
	}
	return fmt.Errorf("disk differs at byte %d (chunk %d holds %s; %d fsynced writes, %d in flight)", i, c/4096, what, len(w.acked), len(w.pending))
}

// A mount is killed with SIGKILL at random moments while a writer writes
// and fsyncs through it, a reader reads, and the stream runs. After each
// kill the cache verifies, a new mount or umount cleans the dead mount, and
// the remount holds every fsynced write and the VM's bytes.
func TestKillDuringWrites(t *testing.T) {
	requireFUSE(t)
	e := bigEnv(t, 2048, 1024) // 8 MiB disk, 4 MiB memory
	e.importBase("base", "base")
	e.create("srv/app.overlay", "--segment-size", "256KiB", "--codec", "zstd")
	srv := e.start("serve", "--addr", "127.0.0.1:0", "--rate", "60mbit", "--rtt", "2ms", e.path("srv"))
	url := strings.Fields(srv.line(t))[3] + "/app.overlay"
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	want := map[string][]byte{"disk": e.read("app/disk.img"), "memory": e.read("app/memory.img")}

	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	w := &writer{}
	next := 0
	const rounds = 10
	for round := range rounds {
		m := e.mount("--fetch-timeout", "10s", url, mnt)
		if round > 0 {
			got, err := os.ReadFile(filepath.Join(mnt, "disk", "image"))
			if err != nil {
				t.Fatalf("round %d: reading the disk after the crash: %v", round, err)
			}
			if err := w.check(got, want["disk"]); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		// The guest writes while a reader touches memory and the stream
		// runs; the daemon dies at a random moment.
		// The kill comes after a random number of fsyncs, while the
		// writer is on its next batch.
		wrote, reached := make(chan error, 1), make(chan struct{})
		killAt := rng.IntN(60)
		go func() {
			wrote <- w.run(filepath.Join(mnt, "disk", "image"), rand.New(rand.NewPCG(seed, uint64(round)+2)), &next, 300, int64(len(want["disk"])), killAt, reached)
		}()
		read := make(chan error, 1)
		go func() {
			_, err := os.ReadFile(filepath.Join(mnt, "memory", "image"))
			read <- err
		}()
		select {
		case <-reached:
		case err := <-wrote:
			t.Fatalf("round %d: the writer stopped before the kill: %v", round, err)
		case <-time.After(20 * time.Second):
			t.Fatalf("round %d: %d fsyncs not done within 20 s", round, killAt)
		}
		m.cmd.Process.Signal(syscall.SIGKILL)
		m.wait(t)
		// After an odd round umount cleaned the dead mount; after an even
		// one this mount did. Its stderr is complete once it has exited.
		if round%2 == 1 && !strings.Contains(m.errText(), "cleaned a dead mount") {
			t.Fatalf("round %d: the mount did not say it cleaned the dead mount; stderr:\n%s", round, m.errText())
		}
		for what, ch := range map[string]chan error{"writer": wrote, "reader": read} {
			select {
			case <-ch:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: the %s is still blocked 10 s after the daemon died", round, what)
			}
		}
		w.mu.Lock()
		t.Logf("round %d: killed after %d fsyncs, with %d writes fsynced in all, %d in flight", round, killAt, w.fsynced, len(w.pending))
		w.mu.Unlock()

		// What the dead daemon cached is verified before anything uses it.
		out := e.ok("cache", "verify")
		if !strings.Contains(out, "verified ") {
			t.Fatalf("round %d: cache verify:\n%s", round, out)
		}
		if round%2 == 1 {
			if out := e.ok("umount", mnt); !strings.Contains(out, "dead mount") {
				t.Fatalf("round %d: umount of the dead mount printed %q", round, out)
			}
		}
	}

	// A last mount: the fsynced writes and every other byte are right,
	// the stream completes, and the cache verifies clean.
	m := e.mount(url, mnt)
	for name, b := range want {
		got, err := os.ReadFile(filepath.Join(mnt, name, "image"))
		if err != nil {
			t.Fatal(err)
		}
		if name == "disk" {
			err = w.check(got, b)
		} else if !bytes.Equal(got, b) {
			err = errors.New("memory differs")
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount exited with %v; stderr:\n%s", err, m.stderr)
	}
	out := e.ok("cache", "verify")
	if !strings.Contains(out, "all good") {
		t.Fatalf("cache verify:\n%s", out)
	}
	t.Logf("%d rounds: %d fsynced writes all kept; %d writes in flight at a kill, each found whole or absent chunk by chunk", rounds, w.fsynced, len(w.acked)-w.fsynced)
}
