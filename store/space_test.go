package store

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// A state dir with less than the reserve free refuses writes with ENOSPC
// before Badger is written to, logs it once, reads go on, and writes work
// again once there is room.
func TestSpaceReserve(t *testing.T) {
	dir := t.TempDir()
	var logBuf bytes.Buffer
	s, err := Open(filepath.Join(dir, "st"), zerolog.New(&logBuf).Level(zerolog.InfoLevel))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := s.OpenCache(overlay.Digest{3}, 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := bytes.Repeat([]byte{7}, 4096)
	id := overlay.ChunkID{Image: overlay.Disk, Index: 1}
	if err := c.PutCow(id, data); err != nil {
		t.Fatal(err)
	}
	defer func(r int64) { SpaceReserve = r }(SpaceReserve)
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	// More than the file system has: as full as it gets.
	SpaceReserve = int64(st.Blocks) * st.Bsize * 2
	for i := range 3 {
		err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: 2}, data)
		if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "is full") {
			t.Fatalf("write %d to a full state dir: %v, want ENOSPC", i, err)
		}
	}
	if err := c.WriteSegment(0, []ChunkData{{ID: id, Data: data}}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("caching a segment on a full state dir: %v, want ENOSPC", err)
	}
	if segs, _ := c.Segments(); len(segs) != 0 {
		t.Fatalf("a segment was marked on a full state dir: %v", segs)
	}
	buf := make([]byte, 4096)
	if ok, err := c.Cow(id, buf); !ok || err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("reading written data on a full state dir: %v %v", ok, err)
	}
	if n := strings.Count(logBuf.String(), "is full"); n != 1 {
		t.Fatalf("%d log lines say the state dir is full, want 1:\n%s", n, logBuf.String())
	}
	SpaceReserve = 0
	if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: 2}, data); err != nil {
		t.Fatalf("write once there is room again: %v", err)
	}
	if !strings.Contains(logBuf.String(), "takes writes again") {
		t.Fatalf("no line says writes work again:\n%s", logBuf.String())
	}
}

// requireRoot skips a test that mounts file systems.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a file system")
	}
}

// A state dir whose file system turns read-only under an open cache (ext4
// after an error, with errors=remount-ro) refuses writes with EROFS; the
// process does not die of SIGBUS in Badger's mapped log, and reads go on.
func TestReadOnlyFileSystem(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 512<<20); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range [][]string{{"mkfs.ext4", "-q", img}, {"mount", "-o", "loop,errors=remount-ro", img, mnt}} {
		if out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Skipf("%s: %v: %s", cmd[0], err, out)
		}
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	src, err := exec.Command("findmnt", "-n", "-o", "SOURCE", mnt).Output()
	if err != nil {
		t.Fatal(err)
	}
	trigger := filepath.Join("/sys/fs/ext4", filepath.Base(strings.TrimSpace(string(src))), "trigger_fs_error")
	if _, err := os.Stat(trigger); err != nil {
		t.Skipf("no %s to make the file system fail", trigger)
	}

	var logBuf bytes.Buffer
	s, err := Open(filepath.Join(mnt, "st"), zerolog.New(&logBuf))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := s.OpenCache(overlay.Digest{4}, 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := bytes.Repeat([]byte{9}, 4096)
	id := overlay.ChunkID{Image: overlay.Disk, Index: 1}
	if err := c.PutCow(id, data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(trigger, []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	// Enough chunks to reach pages of the log never touched before.
	for i := range 512 {
		err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: uint32(10 + i)}, data)
		if !errors.Is(err, syscall.EROFS) {
			t.Fatalf("write %d to a read-only state dir: %v, want EROFS", i, err)
		}
	}
	if err := c.WriteSegment(0, []ChunkData{{ID: id, Data: data}}); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("caching a segment on a read-only state dir: %v, want EROFS", err)
	}
	buf := make([]byte, 4096)
	if ok, err := c.Cow(id, buf); !ok || err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("reading written data on a read-only state dir: %v %v", ok, err)
	}
	if n := strings.Count(logBuf.String(), "is read-only"); n != 1 {
		t.Fatalf("%d log lines say the state dir is read-only, want 1:\n%s", n, logBuf.String())
	}
}

// Below the reserve, what needs no new space still goes through: a chunk
// already written is overwritten in place, and the markers of chunks whose
// bytes were taken before the state dir filled are committed at close, so
// the next mount reads them. A new chunk is refused.
func TestSpaceReserveKeepsTakenWrites(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	open := cacheOpener(t, s, overlay.Digest{12}, 1<<20)
	c := open()
	old, data := bytes.Repeat([]byte{1}, 4096), bytes.Repeat([]byte{7}, 4096)
	committed, pending := overlay.ChunkID{Image: overlay.Disk, Index: 2}, overlay.ChunkID{Image: overlay.Memory, Index: 1}
	if err := c.PutCow(committed, old); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	// Taken, its marker not committed yet.
	if err := c.PutCow(pending, data); err != nil {
		t.Fatal(err)
	}
	defer func(r int64) { SpaceReserve = r }(SpaceReserve)
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	SpaceReserve = int64(st.Blocks) * st.Bsize * 2
	if err := c.PutCow(committed, data); err != nil {
		t.Fatalf("overwriting a written chunk in place below the reserve: %v", err)
	}
	if err := c.WriteCow(pending.Image, data[:512], int64(pending.Index)*4096); err != nil {
		t.Fatalf("overwriting part of a chunk taken before the state dir filled: %v", err)
	}
	if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: 9}, data); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("a new chunk below the reserve: %v, want ENOSPC", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("closing below the reserve: %v", err)
	}
	SpaceReserve = 0
	c = open()
	defer c.Close()
	buf := make([]byte, 4096)
	for _, id := range []overlay.ChunkID{committed, pending} {
		if ok, err := c.Cow(id, buf); !ok || err != nil || !bytes.Equal(buf, data) {
			t.Fatalf("%v after a close below the reserve: written %v, %v, same bytes %v", id, ok, err, bytes.Equal(buf, data))
		}
	}
}
