package handoff

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The parts of QEMU's migration stream (QEMU 7.2, precopy, default
// capabilities and x-ignore-shared) that a handoff reads: sections, RAM
// records, and the device state after the last RAM section.
const (
	qemuMagic   = 0x5145564d // "QEVM"
	qemuVersion = 3

	secEOF        = 0x00
	secStart      = 0x01
	secPart       = 0x02
	secEnd        = 0x03
	secFull       = 0x04
	secSubsection = 0x05
	secConfig     = 0x07
	secCommand    = 0x08
	secFooter     = 0x7e

	ramZero     = 0x02
	ramMemSize  = 0x04
	ramPage     = 0x08
	ramEOS      = 0x10
	ramContinue = 0x20
	ramXBZRLE   = 0x40
	ramHook     = 0x80
	ramCompress = 0x100

	pageSize = 4096
)

// Stream reads a migration stream and splits it: the pages of one RAM
// block, the guest's memory, go to Page as they arrive; everything else
// becomes a device state that resumes the VM with that memory supplied
// from a file, as an overlay's state does.
type Stream struct {
	// Page is told of each page of the memory block: its offset and its
	// bytes, nil for a page of zeros. The bytes are valid only during the
	// call.
	Page func(off int64, data []byte) error
	// Stopped is called when the stream's last RAM section begins: QEMU
	// has stopped the VM, and what follows is what changed since.
	Stopped func()
	// MemorySize, if set, is the size the memory block must have.
	MemorySize int64

	r            *bufio.Reader
	ignoreShared bool
	ramID        uint32
	ramHead      []byte // the START section's header
	blocks       []block
	memBlock     string
	cur          string
	config       []byte
	other        map[pageKey][]byte // pages of the other blocks, last version
	otherOrder   []pageKey
	rest         []byte
	Pages        int64 // memory pages read
}

type block struct {
	name string
	size int64
	addr uint64
}

type pageKey struct {
	block string
	off   int64
}

// errFormat marks a stream this reader does not understand.
var errFormat = errors.New("migration stream")

func bad(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errFormat, fmt.Sprintf(format, args...))
}

// Read reads the whole stream from r, to its end.
func (s *Stream) Read(r io.Reader) error {
	s.r = bufio.NewReaderSize(r, 1<<20)
	s.other = map[pageKey][]byte{}
	var hdr [8]byte
	if _, err := io.ReadFull(s.r, hdr[:]); err != nil {
		return fmt.Errorf("migration stream header: %w", err)
	}
	if m, v := binary.BigEndian.Uint32(hdr[:]), binary.BigEndian.Uint32(hdr[4:]); m != qemuMagic || v != qemuVersion {
		return bad("magic %#x version %d, want QEVM version 3", m, v)
	}
	for {
		t, err := s.r.ReadByte()
		if err != nil {
			return bad("section: %v", err)
		}
		switch t {
		case secConfig:
			if err := s.readConfig(); err != nil {
				return err
			}
		case secStart:
			id, name, rest, err := s.fullHeader()
			if err != nil {
				return err
			}
			if name != "ram" {
				return bad("live section %q: only RAM is supported (no block migration or dirty bitmaps)", name)
			}
			s.ramID = id
			s.ramHead = append([]byte{secStart}, rest...)
			if err := s.ram(); err != nil {
				return err
			}
		case secPart, secEnd:
			id, err := s.be32()
			if err != nil {
				return bad("section id: %v", err)
			}
			if id != s.ramID || s.ramHead == nil {
				return bad("section %d continues no RAM section", id)
			}
			if t == secEnd && s.Stopped != nil {
				s.Stopped()
			}
			if err := s.ram(); err != nil {
				return err
			}
			if err := s.footer(id); err != nil {
				return err
			}
			if t == secEnd {
				// The device state follows, to the end of the stream.
				rest, err := io.ReadAll(s.r)
				if err != nil {
					return fmt.Errorf("migration stream: device state: %w", err)
				}
				if len(rest) == 0 {
					return bad("no device state after the RAM")
				}
				s.rest = rest
				return nil
			}
			continue
		case secFull:
			return bad("device state before the end of RAM")
		case secCommand:
			return bad("a command section: postcopy and return paths are not supported")
		case secEOF:
			return bad("the stream ended before its RAM did")
		default:
			return bad("unknown section type %#x", t)
		}
		if t == secStart {
			if err := s.footer(s.ramID); err != nil {
				return err
			}
		}
	}
}

// readConfig keeps the configuration section as it is: its machine
// type, and the capabilities subsection whose x-ignore-shared the
// destination checks.
func (s *Stream) readConfig() error {
	var buf bytes.Buffer
	tee := io.TeeReader(s.r, &buf)
	var n [4]byte
	if _, err := io.ReadFull(tee, n[:]); err != nil {
		return bad("configuration: %v", err)
	}
	l := binary.BigEndian.Uint32(n[:])
	if l > 256 {
		return bad("configuration: machine name of %d bytes", l)
	}
	if _, err := io.CopyN(io.Discard, tee, int64(l)); err != nil {
		return bad("configuration: %v", err)
	}
	for {
		b, err := s.r.Peek(1)
		if err != nil || b[0] != secSubsection {
			break
		}
		name, err := readSubsectionHead(tee)
		if err != nil {
			return err
		}
		switch name {
		case "configuration/capabilities":
			if _, err := io.ReadFull(tee, n[:]); err != nil {
				return bad("capabilities: %v", err)
			}
			for range binary.BigEndian.Uint32(n[:]) {
				c, err := readStr(tee)
				if err != nil {
					return bad("capabilities: %v", err)
				}
				if c == "x-ignore-shared" {
					s.ignoreShared = true
				}
			}
		case "configuration/target-page-bits":
			if _, err := io.ReadFull(tee, n[:]); err != nil {
				return bad("target page bits: %v", err)
			}
			if binary.BigEndian.Uint32(n[:]) != 12 {
				return bad("target pages of 2^%d bytes; only 4 KiB pages are supported", binary.BigEndian.Uint32(n[:]))
			}
		default:
			return bad("configuration subsection %q", name)
		}
	}
	s.config = append([]byte{secConfig}, buf.Bytes()...)
	return nil
}

func readSubsectionHead(r io.Reader) (string, error) {
	var t [1]byte
	if _, err := io.ReadFull(r, t[:]); err != nil {
		return "", bad("subsection: %v", err)
	}
	name, err := readStr(r)
	if err != nil {
		return "", bad("subsection: %v", err)
	}
	var v [4]byte
	if _, err := io.ReadFull(r, v[:]); err != nil {
		return "", bad("subsection %s: %v", name, err)
	}
	return name, nil
}

func readStr(r io.Reader) (string, error) {
	var l [1]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return "", err
	}
	b := make([]byte, l[0])
	if _, err := io.ReadFull(r, b); err != nil {
		return "", err
	}
	return string(b), nil
}

// fullHeader reads a START or FULL section's header after its type:
// id, name, instance and version. rest is the header's bytes after the
// type.
func (s *Stream) fullHeader() (uint32, string, []byte, error) {
	var buf bytes.Buffer
	tee := io.TeeReader(s.r, &buf)
	var b [4]byte
	if _, err := io.ReadFull(tee, b[:]); err != nil {
		return 0, "", nil, bad("section header: %v", err)
	}
	name, err := readStr(tee)
	if err != nil {
		return 0, "", nil, bad("section header: %v", err)
	}
	var iv [8]byte
	if _, err := io.ReadFull(tee, iv[:]); err != nil {
		return 0, "", nil, bad("section header: %v", err)
	}
	return binary.BigEndian.Uint32(b[:]), name, buf.Bytes(), nil
}

func (s *Stream) footer(id uint32) error {
	t, err := s.r.ReadByte()
	if err != nil {
		return bad("section footer: %v", err)
	}
	got, err := s.be32()
	if t != secFooter || err != nil || got != id {
		return bad("section %d: bad footer", id)
	}
	return nil
}

func (s *Stream) be32() (uint32, error) {
	var b [4]byte
	_, err := io.ReadFull(s.r, b[:])
	return binary.BigEndian.Uint32(b[:]), err
}

func (s *Stream) be64() (uint64, error) {
	var b [8]byte
	_, err := io.ReadFull(s.r, b[:])
	return binary.BigEndian.Uint64(b[:]), err
}

// ram reads one RAM section's records, to its end-of-section record.
func (s *Stream) ram() error {
	page := make([]byte, pageSize)
	for {
		v, err := s.be64()
		if err != nil {
			return bad("RAM record: %v", err)
		}
		flags, addr := v&(pageSize-1), v&^uint64(pageSize-1)
		if flags&ramEOS != 0 {
			return nil
		}
		if flags&ramMemSize != 0 {
			if err := s.memSize(int64(addr)); err != nil {
				return err
			}
			continue
		}
		if flags&(ramXBZRLE|ramCompress|ramHook) != 0 {
			return bad("RAM record flags %#x: xbzrle, compression and RDMA are not supported", flags)
		}
		if flags&ramContinue == 0 {
			name, err := readStr(s.r)
			if err != nil {
				return bad("RAM block name: %v", err)
			}
			s.cur = name
		}
		if s.cur == "" {
			return bad("a page of no block")
		}
		off := int64(addr)
		switch flags &^ ramContinue {
		case ramZero:
			fill, err := s.r.ReadByte()
			if err != nil {
				return bad("zero page: %v", err)
			}
			if fill != 0 {
				for i := range page {
					page[i] = fill
				}
				err = s.put(off, page)
			} else {
				err = s.put(off, nil)
			}
			if err != nil {
				return err
			}
		case ramPage:
			if _, err := io.ReadFull(s.r, page); err != nil {
				return bad("page: %v", err)
			}
			if err := s.put(off, page); err != nil {
				return err
			}
		default:
			return bad("RAM record flags %#x", flags)
		}
	}
}

func (s *Stream) memSize(total int64) error {
	var sum int64
	s.blocks = nil
	for sum < total {
		name, err := readStr(s.r)
		if err != nil {
			return bad("RAM blocks: %v", err)
		}
		size, err := s.be64()
		if err != nil {
			return bad("RAM blocks: %v", err)
		}
		b := block{name: name, size: int64(size)}
		if s.ignoreShared {
			if b.addr, err = s.be64(); err != nil {
				return bad("RAM blocks: %v", err)
			}
		}
		s.blocks = append(s.blocks, b)
		sum += int64(size)
	}
	if sum != total {
		return bad("RAM blocks add up to %d bytes, the stream says %d", sum, total)
	}
	// The guest's memory is the largest block.
	for _, b := range s.blocks {
		if s.memBlock == "" || b.size > s.size(s.memBlock) {
			s.memBlock = b.name
		}
	}
	if size := s.size(s.memBlock); s.MemorySize > 0 && size != s.MemorySize {
		return bad("the guest's RAM block %s has %d bytes, the VM's memory image %d", s.memBlock, size, s.MemorySize)
	}
	return nil
}

func (s *Stream) size(name string) int64 {
	for _, b := range s.blocks {
		if b.name == name {
			return b.size
		}
	}
	return -1
}

// MemoryBlock is the RAM block taken for the guest's memory, and its size.
func (s *Stream) MemoryBlock() (string, int64) { return s.memBlock, s.size(s.memBlock) }

func (s *Stream) put(off int64, data []byte) error {
	if s.cur == s.memBlock {
		if off < 0 || off+pageSize > s.size(s.memBlock) {
			return bad("page at %d beyond block %s", off, s.memBlock)
		}
		s.Pages++
		return s.Page(off, data)
	}
	k := pageKey{s.cur, off}
	if _, ok := s.other[k]; !ok {
		s.otherOrder = append(s.otherOrder, k)
	}
	if data == nil {
		s.other[k] = nil
	} else {
		s.other[k] = append(s.other[k][:0], data...)
	}
	return nil
}

// State returns the device state for a VM whose memory comes from a file:
// the stream with the memory block's pages left out. It is valid once
// Read has returned nil.
func (s *Stream) State() []byte {
	var b bytes.Buffer
	be := func(n int, v uint64) {
		var x [8]byte
		binary.BigEndian.PutUint64(x[:], v)
		b.Write(x[8-n:])
	}
	str := func(v string) { b.WriteByte(byte(len(v))); b.WriteString(v) }
	be(4, qemuMagic)
	be(4, qemuVersion)
	b.Write(s.config)
	b.Write(s.ramHead)
	var total int64
	for _, bl := range s.blocks {
		total += bl.size
	}
	be(8, uint64(total)|ramMemSize)
	for _, bl := range s.blocks {
		str(bl.name)
		be(8, uint64(bl.size))
		if s.ignoreShared {
			be(8, bl.addr)
		}
	}
	be(8, ramEOS)
	b.WriteByte(secFooter)
	be(4, uint64(s.ramID))
	b.WriteByte(secEnd)
	be(4, uint64(s.ramID))
	for _, k := range s.otherOrder {
		d := s.other[k]
		if d == nil {
			be(8, uint64(k.off)|ramZero)
			str(k.block)
			b.WriteByte(0)
			continue
		}
		be(8, uint64(k.off)|ramPage)
		str(k.block)
		b.Write(d)
	}
	be(8, ramEOS)
	b.WriteByte(secFooter)
	be(4, uint64(s.ramID))
	b.Write(s.rest)
	return b.Bytes()
}
