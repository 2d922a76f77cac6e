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

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Access is one line of a trace: a chunk touched at a time measured in
// seconds since the VM resumed.
type Access struct {
	Time  float64
	Chunk overlay.ChunkID
}

// ErrEmpty is returned for a trace with no accesses.
var ErrEmpty = errors.New("trace has no accesses")

// maxLine bounds one trace line; real lines are under 40 bytes.
const maxLine = 4096

// Parse reads a trace: one access a line, "<seconds> <disk|memory> <chunk
// index>", with blank lines and lines starting with '#' ignored. Errors name
// the line.
func Parse(r io.Reader) ([]Access, error) {
	var out []Access
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxLine)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' {
			continue
		}
		f := strings.Fields(text)
		if len(f) != 3 {
			return nil, fmt.Errorf("line %d: want \"<seconds> <disk|memory> <chunk index>\", got %q", line, text)
		}
		t, err := strconv.ParseFloat(f[0], 64)
		if err != nil || t < 0 || math.IsInf(t, 0) || math.IsNaN(t) {
			return nil, fmt.Errorf("line %d: time %q is not a number of seconds >= 0", line, f[0])
		}
		img, err := overlay.ParseImage(f[1])
		if err != nil {
			return nil, fmt.Errorf("line %d: %v", line, err)
		}
		idx, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("line %d: chunk index %q is not a whole number below 2^32", line, f[2])
		}
		out = append(out, Access{Time: t, Chunk: overlay.ChunkID{Image: img, Index: uint32(idx)}})
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("line %d: longer than %d bytes", line+1, maxLine)
		}
		return nil, err
	}
	if len(out) == 0 {
		return nil, ErrEmpty
	}
	return out, nil
}

// ParseFile reads the trace in path; errors name the file.
func ParseFile(path string) ([]Access, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", path, err)
	}
	defer f.Close()
	acc, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", path, err)
	}
	return acc, nil
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

// Write writes accesses in the trace format.
func Write(w io.Writer, acc []Access) error {
	bw := bufio.NewWriter(w)
	for _, a := range acc {
		fmt.Fprintf(bw, "%.6f %s %d\n", a.Time, a.Chunk.Image, a.Chunk.Index)
	}
	return bw.Flush()
}
