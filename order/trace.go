// Package order records and reads access traces and turns them into the
// stream order of an overlay: the chunks a VM touched first are carried
// first. It never touches the network; it only reasons about which chunk
// should travel when.
package order

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Access is one line of a trace: a chunk touched at a time measured in
// seconds since the mount was ready, with the size of the read that touched
// it and how long that read took (both zero when the trace does not say).
type Access struct {
	Time  float64
	Chunk overlay.ChunkID
	Bytes int
	Wait  float64
}

// Mark is a named moment of a run, such as the probe's first success.
type Mark struct {
	Time float64
	Name string
}

// Trace is a parsed trace file.
type Trace struct {
	Accesses []Access
	Marks    []Mark
}

// FirstResponse is the mark that `launch --probe` records.
const FirstResponse = "first-response"

// Mark returns the time of the first mark named name.
func (t *Trace) Mark(name string) (float64, bool) {
	for _, m := range t.Marks {
		if m.Name == name {
			return m.Time, true
		}
	}
	return 0, false
}

// ErrEmpty is returned for a trace with no accesses.
var ErrEmpty = errors.New("trace has no accesses")

// maxLine bounds one trace line; real lines are under 40 bytes.
const maxLine = 4096

// ErrNotText is returned for a file that is not text, such as an overlay
// or an image given where a trace belongs.
var ErrNotText = errors.New("not text: a trace is a text file (docs/FORMAT.md)")

// isText reports whether a line is UTF-8 without control characters other
// than tab and carriage return.
func isText(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, c := range b {
		if c < 0x20 && c != '\t' && c != '\r' || c == 0x7f {
			return false
		}
	}
	return true
}

// clip shortens text quoted in an error to what a terminal line can hold.
func clip(s string) string {
	if len(s) <= 60 {
		return s
	}
	i := 60
	for !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}

// Parse reads a trace: one access a line, "<seconds> <disk|memory> <chunk
// index>", optionally followed by "<bytes read> <seconds the read took>";
// or a mark, "<seconds> mark <name>". Blank lines and lines starting with '#'
// are ignored. Errors name the line.
func Parse(r io.Reader) (*Trace, error) {
	t := &Trace{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxLine)
	line := 0
	for sc.Scan() {
		line++
		if !isText(sc.Bytes()) {
			return nil, fmt.Errorf("line %d: %w", line, ErrNotText)
		}
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' {
			continue
		}
		f := strings.Fields(text)
		if len(f) != 3 && len(f) != 5 {
			return nil, fmt.Errorf("line %d: want \"<seconds> <disk|memory> <chunk index> [<bytes> <wait>]\" or \"<seconds> mark <name>\", got %q", line, clip(text))
		}
		tm, err := strconv.ParseFloat(f[0], 64)
		if err != nil || tm < 0 || math.IsInf(tm, 0) || math.IsNaN(tm) {
			return nil, fmt.Errorf("line %d: time %q is not a number of seconds >= 0", line, f[0])
		}
		if f[1] == "mark" && len(f) == 3 {
			t.Marks = append(t.Marks, Mark{Time: tm, Name: f[2]})
			continue
		}
		img, err := overlay.ParseImage(f[1])
		if err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		idx, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("line %d: chunk index %q is not a whole number below 2^32", line, f[2])
		}
		a := Access{Time: tm, Chunk: overlay.ChunkID{Image: img, Index: uint32(idx)}}
		if len(f) == 5 {
			n, err1 := strconv.ParseUint(f[3], 10, 31)
			w, err2 := strconv.ParseFloat(f[4], 64)
			if err1 != nil || err2 != nil || w < 0 || math.IsInf(w, 0) || math.IsNaN(w) {
				return nil, fmt.Errorf("line %d: read size %q and wait %q must be numbers >= 0", line, f[3], f[4])
			}
			a.Bytes, a.Wait = int(n), w
		}
		t.Accesses = append(t.Accesses, a)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("line %d: longer than %d bytes: is this a trace file?", line+1, maxLine)
		}
		return nil, err
	}
	if len(t.Accesses) == 0 {
		return nil, ErrEmpty
	}
	return t, nil
}

// ParseFile reads the trace in path; errors name the file.
func ParseFile(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", path, err)
	}
	defer f.Close()
	t, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", path, err)
	}
	return t, nil
}

// Check reports the first access that names a chunk beyond its image, given
// the number of chunks of each image.
func Check(acc []Access, chunks [2]int) error {
	for _, a := range acc {
		if n := chunks[a.Chunk.Image]; int64(a.Chunk.Index) >= int64(n) {
			return fmt.Errorf("%s at %gs is beyond the image (%d chunks)", a.Chunk, a.Time, n)
		}
	}
	return nil
}

// FirstAccess returns each chunk once, in order of its first access. Accesses
// at the same time keep their order in the trace.
func FirstAccess(acc []Access) []overlay.ChunkID {
	sorted := append([]Access(nil), acc...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Time < sorted[j].Time })
	seen := make(map[overlay.ChunkID]bool, len(sorted))
	var out []overlay.ChunkID
	for _, a := range sorted {
		if !seen[a.Chunk] {
			seen[a.Chunk] = true
			out = append(out, a.Chunk)
		}
	}
	return out
}

// Write writes a trace in the trace format, marks first.
func Write(w io.Writer, t *Trace) error { return WriteBlocks(w, t.Marks, t.Accesses) }

// WriteBlocks writes marks and then the accesses of each block in turn in
// the trace format, for a trace kept in pieces that it would cost memory to
// join.
func WriteBlocks(w io.Writer, marks []Mark, blocks ...[]Access) error {
	bw := bufio.NewWriter(w)
	for _, m := range marks {
		fmt.Fprintf(bw, "%.6f mark %s\n", m.Time, m.Name)
	}
	for _, b := range blocks {
		for _, a := range b {
			if a.Bytes > 0 || a.Wait > 0 {
				fmt.Fprintf(bw, "%.6f %s %d %d %.6f\n", a.Time, a.Chunk.Image, a.Chunk.Index, a.Bytes, a.Wait)
			} else {
				fmt.Fprintf(bw, "%.6f %s %d\n", a.Time, a.Chunk.Image, a.Chunk.Index)
			}
		}
	}
	return bw.Flush()
}
