package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"

	cfs "github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// sparseImage is a large image held in no memory: zeros, except one chunk
// of pseudo-random bytes every stride chunks.
type sparseImage struct {
	size, stride int64
	seed         byte
}

func (s sparseImage) chunk(idx int64, p []byte) {
	if idx%s.stride != 0 {
		clear(p)
		return
	}
	var ctr [9]byte
	binary.LittleEndian.PutUint64(ctr[:], uint64(idx))
	ctr[8] = s.seed
	for o := 0; o < len(p); o += 32 {
		h := sha256.Sum256(append(ctr[:], byte(o/32)))
		copy(p[o:], h[:])
	}
}

func (s sparseImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	n := 0
	buf := make([]byte, 4096)
	for n < len(p) && off+int64(n) < s.size {
		pos := off + int64(n)
		s.chunk(pos/4096, buf)
		n += copy(p[n:min(len(p), int(s.size-off))], buf[pos%4096:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// vmHWM reads a process's peak resident memory from /proc.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// A mount of an overlay of an 8 GiB disk and a 2 GiB memory image stays
// under fs.MemoryBound while every byte of both images is read through
// it, which touches every chunk and so fills the access trace.
func TestMountMemoryBound(t *testing.T) {
	requireFUSE(t)
	if testing.Short() {
		t.Skip("reads 10 GiB through a mount")
	}
	e := newEnv(t)
	e.importBase("base", "base")
	st, err := store.Open(e.state, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	rec, err := st.Resolve("base")
	if err != nil {
		t.Fatal(err)
	}
	base, closeBase, err := st.Open(rec)
	if err != nil {
		t.Fatal(err)
	}
	// One changed chunk every 4 MiB: 2560 chunks of data.
	in := &overlay.Input{
		Images: [2]io.ReaderAt{sparseImage{8 << 30, 1024, 1}, sparseImage{2 << 30, 1024, 2}},
		Sizes:  [2]int64{8 << 30, 2 << 30},
		State:  []byte("app state"),
	}
	os.MkdirAll(e.path("srv"), 0o755)
	sum, err := overlay.Build(e.path("srv/big.overlay"), base, in, overlay.BuildOptions{Codec: overlay.CodecZstd})
	closeBase()
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	o, f, err := openOverlay(e.path("srv/big.overlay"))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	bound := cfs.MemoryBound(o.Header)

	srv := e.start("serve", "--addr", "127.0.0.1:0", e.path("srv"))
	url := strings.Fields(srv.line(t))[3] + "/big.overlay"
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	trace := e.path("big.trace")
	m := e.mount("--trace-out", trace, url, mnt)
	ready := vmHWM(t, m.cmd.Process.Pid)
	var read int64
	buf := make([]byte, 1<<20)
	for _, img := range overlay.Images {
		f, err := os.Open(filepath.Join(mnt, img.String(), "image"))
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(buf))
		for off := int64(0); off < in.Sizes[img]; off += int64(len(buf)) {
			if _, err := io.ReadFull(f, buf); err != nil {
				t.Fatalf("%s at %d: %v", img, off, err)
			}
			in.Images[img].ReadAt(want, off)
			if !bytes.Equal(buf, want) {
				t.Fatalf("%s bytes %d+%d differ", img, off, len(buf))
			}
			read += int64(len(buf))
		}
		f.Close()
	}
	peak := vmHWM(t, m.cmd.Process.Pid)
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount exited with %v; stderr:\n%s", err, m.errText())
	}
	// Writing the trace of every chunk at exit is part of the bound too.
	exit := m.cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss << 10
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	chunks := o.Header.Chunks(overlay.Disk) + o.Header.Chunks(overlay.Memory)
	if n := bytes.Count(b, []byte("\n")) - 1; n != chunks {
		t.Fatalf("the trace holds %d accesses, want one for each of the %d chunks", n, chunks)
	}
	t.Logf("%d data chunks in %d segments; read %d GiB; daemon peak RSS %d MiB at ready, %d MiB after reading everything, %d MiB after writing the trace of %d chunks at exit; bound %d MiB",
		sum.Counts[overlay.Disk][overlay.Data]+sum.Counts[overlay.Memory][overlay.Data], sum.Segments, read>>30, ready>>20, peak>>20, exit>>20, chunks, bound>>20)
	if max(peak, exit) > bound {
		t.Fatalf("the daemon's peak RSS is %d MiB, over the bound of %d MiB", max(peak, exit)>>20, bound>>20)
	}
}
