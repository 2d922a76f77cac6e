package store

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// dirtyLogPages returns the dirty kB of every mapping, in this process, of
// a Badger log (memtable or value log) under dir, by file.
func dirtyLogPages(t *testing.T, dir string) map[string]int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]int{}
	cur := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			// A mapping's header: range perms offset dev inode [path].
			cur = ""
			if p := fields[len(fields)-1]; len(fields) == 6 && strings.HasPrefix(p, dir+"/") && (strings.HasSuffix(p, ".mem") || strings.HasSuffix(p, ".vlog")) {
				cur = filepath.Base(p)
				out[cur] += 0
			}
			continue
		}
		if cur != "" && len(fields) == 3 && (fields[0] == "Shared_Dirty:" || fields[0] == "Private_Dirty:") {
			n, _ := strconv.Atoi(fields[1])
			out[cur] += n
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// copyTree copies src to dst as the files are now; cp skips the holes of
// Badger's sparse logs. A log that Badger flushes and deletes during the
// copy makes cp fail; the copy is then made again.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	var out []byte
	var err error
	for range 5 {
		os.RemoveAll(dst)
		if out, err = exec.Command("cp", "-r", "--sparse=always", src, dst).CombinedOutput(); err == nil {
			return
		}
	}
	t.Fatalf("cp: %v: %s", err, out)
}

// Every chunk written before a Sync is in files whose pages have all been
// written back when Sync returns, even after the memtable holding its
// marker filled up and was rotated: the logs of rotated memtables have no
// dirty page left, and a copy of the state dir taken then, while the
// process still runs, holds every chunk. Without a sync of the rotated
// memtables' logs, their pages stay dirty until Badger has flushed them.
// Markers are small, so large discards between the writes fill the
// memtables.
func TestSyncCoversRotatedMemtables(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{9}
	sizes := [2]int64{1 << 30, 8 << 30}
	c, err := s.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	chunk := func(i int) []byte {
		b := bytes.Repeat([]byte{byte(i), byte(i >> 8), 0x5a, 0xa5}, 1024)
		binary.BigEndian.PutUint32(b, uint32(i))
		return b
	}
	// 8 MiB memtables: 40 rounds of 16 written chunks and 30000
	// discarded ones fill about eight of them. Each rotation is a chance to
	// catch a rotated log with dirty pages before Badger's flush removes
	// it, so six make a miss of all of them, with the rotated logs not
	// synced, unlikely.
	const rounds, n, discards = 40, 16, 30000
	logs := map[string]bool{}
	for r := range rounds {
		for j := r * n; j < (r+1)*n; j++ {
			if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: uint32(j)}, chunk(j)); err != nil {
				t.Fatal(err)
			}
		}
		ids := make([]overlay.ChunkID, discards)
		for j := range ids {
			ids[j] = overlay.ChunkID{Image: overlay.Memory, Index: uint32(r*discards + j)}
		}
		if err := c.DiscardCows(ids); err != nil {
			t.Fatal(err)
		}
		if err := c.Sync(); err != nil {
			t.Fatal(err)
		}
		for f, kb := range dirtyLogPages(t, c.dbDir) {
			logs[f] = true
			if kb != 0 {
				t.Fatalf("after the Sync that followed round %d, Badger's log %s still has %d kB of dirty pages", r, f, kb)
			}
		}
	}
	mems := 0
	for f := range logs {
		if strings.HasSuffix(f, ".mem") {
			mems++
		}
	}
	if mems < 6 {
		t.Fatalf("only %d memtable logs were seen: the memtables did not rotate", mems)
	}

	// What the files hold now is what a power cut would leave of them.
	cp := filepath.Join(dir, "copy")
	copyTree(t, filepath.Join(dir, "st"), cp)
	os.Remove(filepath.Join(cp, "overlays", id.String(), "lock"))
	s2, err := Open(cp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, err := s2.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	buf := make([]byte, 4096)
	for i := range rounds * n {
		ok, err := c2.Cow(overlay.ChunkID{Image: overlay.Disk, Index: uint32(i)}, buf)
		if err != nil || !ok || !bytes.Equal(buf, chunk(i)) {
			t.Fatalf("chunk %d in the copy taken after Sync: found %v, err %v, same bytes %v", i, ok, err, bytes.Equal(buf, chunk(i)))
		}
	}
	if zero, _ := c2.DiscardedChunks(); len(zero) != rounds*discards {
		t.Fatalf("%d discarded chunks in the copy taken after Sync, want %d", len(zero), rounds*discards)
	}
}

// A chunk written without an fsync reaches the database's marker within
// about commitEvery, so a daemon killed later, with its page cache intact,
// keeps it: a copy of the state dir taken then holds it.
func TestWrittenCommitsWithoutSync(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{6}
	sizes := [2]int64{1 << 20, 1 << 20}
	c, err := s.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := bytes.Repeat([]byte{0x3c}, 4096)
	chunk := overlay.ChunkID{Image: overlay.Disk, Index: 5}
	if err := c.PutCow(chunk, data); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * commitEvery)
	for {
		err := c.db.View(func(txn *badger.Txn) error {
			_, err := txn.Get(cowKey(chunk.Image, chunk.Index))
			return err
		})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no marker for the written chunk %s after it was written: %v", 30*commitEvery, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cp := filepath.Join(dir, "copy")
	copyTree(t, filepath.Join(dir, "st"), cp)
	os.Remove(filepath.Join(cp, "overlays", id.String(), "lock"))
	s2, err := Open(cp, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	c2, err := s2.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	got := make([]byte, 4096)
	if ok, err := c2.Cow(chunk, got); !ok || err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the chunk in a copy of the state dir: found %v, err %v, same bytes %v", ok, err, bytes.Equal(got, data))
	}
}
