package handoff

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// streamBuilder writes a migration stream as QEMU 7.2 lays it out.
type streamBuilder struct{ bytes.Buffer }

func (b *streamBuilder) be(n int, v uint64) {
	var x [8]byte
	binary.BigEndian.PutUint64(x[:], v)
	b.Write(x[8-n:])
}
func (b *streamBuilder) str(s string) { b.WriteByte(byte(len(s))); b.WriteString(s) }

func (b *streamBuilder) header(caps ...string) {
	b.be(4, qemuMagic)
	b.be(4, qemuVersion)
	b.WriteByte(secConfig)
	b.be(4, 5)
	b.WriteString("pc-q3")
	if len(caps) > 0 {
		b.WriteByte(secSubsection)
		b.str("configuration/capabilities")
		b.be(4, 1)
		b.be(4, uint64(len(caps)))
		for _, c := range caps {
			b.str(c)
		}
	}
}

func (b *streamBuilder) page(block string, off uint64, fill byte, cont bool) {
	if fill == 0 {
		b.zero(block, off, cont)
		return
	}
	f := uint64(ramPage)
	if cont {
		b.be(8, off|f|ramContinue)
	} else {
		b.be(8, off|f)
		b.str(block)
	}
	b.Write(bytes.Repeat([]byte{fill}, pageSize))
}

func (b *streamBuilder) zero(block string, off uint64, cont bool) {
	if cont {
		b.be(8, off|ramZero|ramContinue)
	} else {
		b.be(8, off|ramZero)
		b.str(block)
	}
	b.WriteByte(0)
}

func (b *streamBuilder) end(id uint32) {
	b.be(8, ramEOS)
	b.WriteByte(secFooter)
	b.be(4, uint64(id))
}

const ramSec = 2

func (b *streamBuilder) ramStart(ignoreShared bool) {
	b.WriteByte(secStart)
	b.be(4, ramSec)
	b.str("ram")
	b.be(4, 0)
	b.be(4, 4)
	b.be(8, (8*pageSize+2*pageSize)|ramMemSize)
	for _, bl := range []struct {
		name string
		size uint64
	}{{"ram", 8 * pageSize}, {"pc.rom", 2 * pageSize}} {
		b.str(bl.name)
		b.be(8, bl.size)
		if ignoreShared {
			b.be(8, 0xc0000)
		}
	}
	b.end(ramSec)
}

func (b *streamBuilder) section(t byte) {
	b.WriteByte(t)
	b.be(4, ramSec)
}

// A stream split: the memory block's pages to Page, the last version of
// each; the other blocks' pages and the device state into State, which
// reads back as a stream of its own with no memory pages.
func TestStreamSplitsMemoryFromState(t *testing.T) {
	var b streamBuilder
	b.header("x-ignore-shared")
	b.ramStart(true)
	b.section(secPart)
	b.page("ram", 0, 1, false)
	b.page("ram", pageSize, 2, true)
	b.zero("ram", 2*pageSize, true)
	b.page("pc.rom", 0, 9, false)
	b.page("ram", 3*pageSize, 4, false)
	b.end(ramSec)
	b.section(secPart)
	b.page("ram", 0, 5, false) // dirtied again
	b.end(ramSec)
	b.section(secEnd)
	b.page("ram", pageSize, 6, false)
	b.page("pc.rom", pageSize, 7, false)
	b.end(ramSec)
	device := []byte{secFull, 0, 0, 0, 3, 3, 'c', 'p', 'u', 0, 0, 0, 0, 0, 0, 0, 1, 0xaa, secFooter, 0, 0, 0, 3, secEOF}
	b.Write(device)

	mem := map[int64]byte{}
	var order []int64
	stoppedAt := -1
	s := &Stream{
		Page: func(off int64, data []byte) error {
			order = append(order, off)
			if data == nil {
				mem[off] = 0
			} else {
				mem[off] = data[0]
			}
			return nil
		},
	}
	s.Stopped = func() { stoppedAt = len(order) }
	if err := s.Read(bytes.NewReader(b.Bytes())); err != nil {
		t.Fatal(err)
	}
	want := map[int64]byte{0: 5, pageSize: 6, 2 * pageSize: 0, 3 * pageSize: 4}
	for off, v := range want {
		if mem[off] != v {
			t.Errorf("page at %d: %d, want %d", off, mem[off], v)
		}
	}
	if stoppedAt != 5 || len(order) != 6 {
		t.Fatalf("stopped after %d of %d pages, want 5 of 6", stoppedAt, len(order))
	}
	if name, size := s.MemoryBlock(); name != "ram" || size != 8*pageSize {
		t.Fatalf("memory block %s of %d bytes", name, size)
	}

	// The state: a stream of its own, the other block's last pages in it,
	// the device state as it was, and no page of memory.
	state := s.State()
	if !bytes.HasSuffix(state, device) {
		t.Fatal("the device state is not carried as it was")
	}
	var again Stream
	again.Page = func(off int64, data []byte) error {
		t.Errorf("the state holds a memory page at %d", off)
		return nil
	}
	if err := again.Read(bytes.NewReader(state)); err != nil {
		t.Fatalf("the state does not read as a stream: %v", err)
	}
	if !again.ignoreShared {
		t.Fatal("the state lost the x-ignore-shared capability its destination checks")
	}
	for off, v := range map[int64]byte{0: 9, pageSize: 7} {
		if d := again.other[pageKey{"pc.rom", off}]; d == nil || d[0] != v {
			t.Fatalf("pc.rom at %d in the state: %v, want %d", off, d, v)
		}
	}
}

func TestStreamRefusesWhatItDoesNotKnow(t *testing.T) {
	build := func(f func(b *streamBuilder)) []byte {
		var b streamBuilder
		b.header("x-ignore-shared")
		b.ramStart(true)
		f(&b)
		return b.Bytes()
	}
	for name, tc := range map[string]struct {
		stream []byte
		want   string
	}{
		"bad magic": {[]byte("QEVX\x00\x00\x00\x03"), "magic"},
		"compressed pages": {build(func(b *streamBuilder) {
			b.section(secPart)
			b.be(8, ramCompress)
			b.str("ram")
		}), "compression"},
		"a page of no block": {build(func(b *streamBuilder) {
			b.section(secPart)
			b.be(8, ramPage|ramContinue)
		}), "no block"},
		"a page beyond the block": {build(func(b *streamBuilder) {
			b.section(secPart)
			b.page("ram", 8*pageSize, 1, false)
		}), "beyond"},
		"device state before the end of RAM": {build(func(b *streamBuilder) { b.WriteByte(secFull) }), "before the end"},
		"cut short": {build(func(b *streamBuilder) {
			b.section(secPart)
			b.page("ram", 0, 1, false)
		}), "RAM record"},
		"a bad footer": {build(func(b *streamBuilder) {
			b.section(secPart)
			b.be(8, ramEOS)
			b.WriteByte(secFooter)
			b.be(4, 99)
		}), "footer"},
	} {
		t.Run(name, func(t *testing.T) {
			s := &Stream{Page: func(int64, []byte) error { return nil }}
			err := s.Read(bytes.NewReader(tc.stream))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
			if tc.want != "magic" && !errors.Is(err, errFormat) {
				t.Fatalf("%v is not a format error", err)
			}
		})
	}
}
