package fs_test

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// TestDiscard punches holes in and zeroes ranges of both images through the
// mount, as QEMU does for a guest's TRIM and freed pages: the ranges read
// as zeros, also after a remount; whole chunks count as discarded and stop
// counting in st_blocks.
func TestDiscard(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	url := srv.URL + "/app.overlay"
	m, err := v.mount(t, url, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	const c = 4096
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	memSize := int64(len(v.want[overlay.Memory]))
	ops := []struct {
		img       overlay.Image
		mode      uint32
		off, n    int64
		whole     int // chunks discarded whole
		heldWhole int // of them, chunks that held bytes before
	}{
		{overlay.Disk, punch, 8 * c, 4 * c, 4, 4},                                         // whole chunks
		{overlay.Disk, punch, 20*c + 100, c - 50, 0, 0},                                   // inside two chunks
		{overlay.Disk, unix.FALLOC_FL_ZERO_RANGE, 40*c + 1000, 4 * c, 3, 3},               // partial, whole, partial
		{overlay.Memory, punch, 2 * c, 3 * c, 3, 3},                                       // whole chunks
		{overlay.Memory, unix.FALLOC_FL_ZERO_RANGE, memSize - 100 - c - 7, 107 + c, 2, 2}, // to the end: the short last chunk is whole
		{overlay.Memory, punch, memSize - 50, 1 << 20, 0, 0},                              // past the end: cut at it
		{overlay.Disk, punch, 8 * c, 4 * c, 0, 0},                                         // again: nothing changes
		{overlay.Memory, punch, 12 * c, 2 * c, 0, 0},                                      // chunks of zeros already
	}
	var blocks [2]int64
	for _, img := range overlay.Images {
		blocks[img] = stBlocks(t, m.path(img))
	}
	want := [2][]byte{append([]byte(nil), v.want[0]...), append([]byte(nil), v.want[1]...)}
	var whole int
	var heldWhole [2]int64
	for _, op := range ops {
		f, err := os.OpenFile(m.path(op.img), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Fallocate(int(f.Fd()), op.mode, op.off, op.n); err != nil {
			t.Fatalf("fallocate %s mode %#x %d+%d: %v", op.img, op.mode, op.off, op.n, err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		clear(want[op.img][op.off:min(op.off+op.n, int64(len(want[op.img])))])
		whole += op.whole
		heldWhole[op.img] += int64(op.heldWhole)
	}
	check := func(m *mounted, when string) {
		t.Helper()
		for _, img := range overlay.Images {
			got, err := m.readAt(img, 0, len(want[img]))
			if err != nil || !bytes.Equal(got, want[img]) {
				t.Fatalf("%s: %s reads back differently (%v)", when, img, err)
			}
			if b := stBlocks(t, m.path(img)); img == overlay.Disk && b != blocks[img]-heldWhole[img]*c/512 || b >= blocks[img] {
				t.Fatalf("%s: %s st_blocks %d, was %d before %d chunks were discarded", when, img, b, blocks[img], heldWhole[img])
			}
		}
		if st := m.f.Stats(); st.ChunksDiscarded != whole {
			t.Fatalf("%s: chunks_discarded %d, want %d", when, st.ChunksDiscarded, whole)
		}
	}
	check(m, "after the discards")
	// Closed before the unmount below: a file left open would make it a
	// lazy detach, whose server must then outlive the test to answer the
	// close (a FLUSH, which the kernel waits for without interruption).
	sf, err := os.Open(filepath.Join(m.dir, "streams", "chunks_discarded"))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(sf)
	lines := 0
	for sc.Scan() {
		lines++
	}
	sf.Close()
	if lines != whole {
		t.Fatalf("streams/chunks_discarded has %d lines, want %d", lines, whole)
	}

	// Modes other than the two discards, and a zero-range that would grow
	// the image, are refused and change nothing.
	f, err := os.OpenFile(m.path(overlay.Disk), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, c); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Fatalf("fallocate mode 0: %v, want EOPNOTSUPP", err)
	}
	size := int64(len(want[overlay.Disk]))
	if err := syscall.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, size-c, 2*c); !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("zero-range past the end: %v, want EFBIG", err)
	}
	f.Close()
	check(m, "after refused fallocates")

	m.unmount()
	m, err = v.mount(t, url, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	check(m, "after a remount")
	// The discarded chunks are markers, not chunks of zeros.
	if ids, err := m.cache.DiscardedChunks(); err != nil || len(ids) != whole {
		t.Fatalf("the store holds %d discard markers (%v), want %d", len(ids), err, whole)
	}
}

func stBlocks(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}
