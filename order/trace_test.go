package order

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/cloudletfs/cloudletfs/overlay"
)

func TestParse(t *testing.T) {
	in := "# resumed\n0.000 memory 5\n0.010 disk 2 131072 0.002\n\n0.005 memory 7\n0.020 memory 5\n0.5 mark first-response\n"
	tr, err := Parse(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	acc := tr.Accesses
	if m, ok := tr.Mark(FirstResponse); !ok || m != 0.5 {
		t.Fatalf("mark: %v %v", m, ok)
	}
	if acc[1].Bytes != 131072 || acc[1].Wait != 0.002 {
		t.Fatalf("read size and wait: %+v", acc[1])
	}
	if len(acc) != 4 {
		t.Fatalf("got %d accesses, want 4", len(acc))
	}
	got := FirstAccess(acc)
	want := []overlay.ChunkID{{Image: overlay.Memory, Index: 5}, {Image: overlay.Memory, Index: 7}, {Image: overlay.Disk, Index: 2}}
	if len(got) != len(want) {
		t.Fatalf("first access %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("first access %v, want %v", got, want)
		}
	}
	if err := Check(acc, [2]int{3, 8}); err != nil {
		t.Fatal(err)
	}
	if err := Check(acc, [2]int{2, 8}); err == nil || !strings.Contains(err.Error(), "disk chunk 2") {
		t.Fatalf("chunk beyond the image: got %v", err)
	}
	var buf bytes.Buffer
	if err := Write(&buf, tr); err != nil {
		t.Fatal(err)
	}
	back, err := Parse(&buf)
	if err != nil || len(back.Accesses) != len(acc) || len(back.Marks) != 1 || back.Accesses[1] != acc[1] {
		t.Fatalf("round trip: %v, %+v", err, back)
	}
}

func TestParseErrors(t *testing.T) {
	for in, want := range map[string]string{
		"":                     "no accesses",
		"# only a comment\n\n": "no accesses",
		"0.1 disk\n":           "line 1",
		"x disk 1\n":           "time",
		"-1 disk 1\n":          "time",
		"0 swap 1\n":           "unknown image",
		"0 disk -1\n":          "chunk index",
		"0 disk 99999999999\n": "chunk index",
		"0 disk 1\n0 disk\n":   "line 2",
		"0 disk 1 5\n":         "line 1",
		"0 disk 1 x 0.1\n":     "read size",
		"0 mark\n":             "line 1",
	} {
		_, err := Parse(strings.NewReader(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error containing %q", in, err, want)
		}
	}
	if _, err := Parse(strings.NewReader("")); !errors.Is(err, ErrEmpty) {
		t.Errorf("empty trace: %v is not ErrEmpty", err)
	}
}

// A binary file given as a trace, here the start of an overlay, is refused
// in one short line that neither dumps its bytes nor runs on.
func TestParseBinary(t *testing.T) {
	bin := append([]byte("CLOUDLET\x01\x00\x00\x00\x00\x10\x00\x00"), bytes.Repeat([]byte{0x8f, 0xfe, 0x03, 'a'}, 40)...)
	long := strings.Repeat("0.1 disk 1 ", 20) + "\n"
	for name, in := range map[string]string{"binary": string(bin), "long line": long} {
		_, err := Parse(strings.NewReader(in))
		if err == nil {
			t.Fatalf("%s: parsed", name)
		}
		msg := err.Error()
		if len(msg) > 200 || strings.ContainsAny(msg, "\x00\x01\x03") || strings.Contains(msg, "\\x") {
			t.Errorf("%s: error of %d bytes: %q", name, len(msg), msg)
		}
	}
	if _, err := Parse(bytes.NewReader(bin)); !errors.Is(err, ErrNotText) {
		t.Errorf("binary: %v is not ErrNotText", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("0.000 memory 5\n0.010 disk 2\n")
	f.Add("# c\n\n1e3 disk 4294967295\n")
	f.Add("0 disk 1\n0 disk\n")
	f.Fuzz(func(t *testing.T, in string) {
		tr, err := Parse(strings.NewReader(in))
		if err != nil {
			return
		}
		acc := tr.Accesses
		// What parses must survive a round trip through Write.
		var buf bytes.Buffer
		if err := Write(&buf, tr); err != nil {
			t.Fatal(err)
		}
		back, err := Parse(&buf)
		if err != nil || len(back.Accesses) != len(acc) {
			t.Fatalf("round trip of %q: %v", in, err)
		}
		for i := range acc {
			if back.Accesses[i].Chunk != acc[i].Chunk {
				t.Fatalf("round trip changed %v to %v", acc[i], back.Accesses[i])
			}
		}
		FirstAccess(acc)
	})
}
