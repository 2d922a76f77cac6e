package overlay

import (
	"bytes"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Codec names the compression of one segment or metadata blob. The value is
// stored in the overlay, so existing values never change meaning.
type Codec uint8

// Codecs a reader of format version 1 understands.
const (
	CodecNone Codec = 0
	CodecXZ   Codec = 1
	CodecZstd Codec = 2
)

func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecXZ:
		return "xz"
	case CodecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// ParseCodec turns a codec name given by a user into a Codec.
func ParseCodec(name string) (Codec, error) {
	switch strings.ToLower(name) {
	case "xz":
		return CodecXZ, nil
	case "zstd":
		return CodecZstd, nil
	case "none":
		return CodecNone, nil
	}
	return 0, fmt.Errorf("unknown codec %q: choose xz or zstd", name)
}

func (c Codec) valid() bool { return c <= CodecZstd }

// zstd encoders and decoders are safe for concurrent use through
// EncodeAll/DecodeAll, so one of each serves the whole process.
var (
	zstdEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
	zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxSegmentRaw+1))
)

// compress returns raw compressed with codec c.
func compress(c Codec, raw []byte) ([]byte, error) {
	switch c {
	case CodecNone:
		return append([]byte(nil), raw...), nil
	case CodecZstd:
		return zstdEnc.EncodeAll(raw, make([]byte, 0, len(raw)/2)), nil
	case CodecXZ:
		var buf bytes.Buffer
		buf.Grow(len(raw) / 2)
		cfg := xz.WriterConfig{DictCap: dictCapFor(len(raw)), CheckSum: xz.None}
		w, err := cfg.NewWriter(&buf)
		if err != nil {
			return nil, err
		}
		if _, err := w.Write(raw); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		return buf.Bytes(), nil
	}
	return nil, fmt.Errorf("codec %v is not supported", c)
}

// dictCapFor keeps the xz dictionary no larger than the data, so that a reader
// never allocates more than a segment is worth.
func dictCapFor(n int) int {
	d := 4096
	for d < n && d < 64<<20 {
		d <<= 1
	}
	return d
}

// decompress decodes comp into exactly rawLen bytes. Any other length is an
// error: a segment that decodes to more or less than the manifest says is
// corrupt, and decoding stops at rawLen+1 bytes so a hostile input cannot
// make us allocate more.
func decompress(c Codec, comp []byte, rawLen int) ([]byte, error) {
	switch c {
	case CodecNone:
		if len(comp) != rawLen {
			return nil, fmt.Errorf("stored length %d, want %d", len(comp), rawLen)
		}
		return comp, nil
	case CodecZstd:
		out, err := zstdDec.DecodeAll(comp, make([]byte, 0, rawLen))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		if len(out) != rawLen {
			return nil, fmt.Errorf("decoded %d bytes, want %d", len(out), rawLen)
		}
		return out, nil
	case CodecXZ:
		r, err := xz.ReaderConfig{DictCap: 4096}.NewReader(bytes.NewReader(comp))
		if err != nil {
			return nil, fmt.Errorf("xz: %w", err)
		}
		return readExactly(r, rawLen)
	}
	return nil, fmt.Errorf("codec %v is not supported by this build", c)
}

// decompressStream returns a reader over c-compressed data in r.
func decompressStream(c Codec, r io.Reader) (io.Reader, error) {
	switch c {
	case CodecNone:
		return r, nil
	case CodecZstd:
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(64<<20))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	case CodecXZ:
		return xz.NewReader(r)
	}
	return nil, fmt.Errorf("codec %v is not supported by this build", c)
}

// readExactly reads exactly n bytes from r and checks that r has nothing more.
func readExactly(r io.Reader, n int) ([]byte, error) {
	out := make([]byte, n)
	if _, err := io.ReadFull(r, out); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return nil, fmt.Errorf("decoded fewer than %d bytes", n)
		}
		return nil, err
	}
	var one [1]byte
	switch _, err := io.ReadFull(r, one[:]); err {
	case io.EOF:
		return out, nil
	case nil:
		return nil, fmt.Errorf("decoded more than %d bytes", n)
	default:
		return nil, err
	}
}
