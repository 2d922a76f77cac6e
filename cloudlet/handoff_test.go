package cloudlet_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/cloudlet"
)

// The destination's side of a handoff refuses what it cannot take, each
// with a status and a reason, and keeps a segment only whole and by its
// sha256.
func TestHandoffPrepareRefusals(t *testing.T) {
	u := start(t, cloudlet.Options{})
	good := importBase(t, u.opt.StateDir, "good", baseFiles(t, t.TempDir(), 1, true))
	bare := importBase(t, u.opt.StateDir, "bare", baseFiles(t, t.TempDir(), 2, false))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const hid = "0123456789abcdef0123456789abcdef"

	err := u.client.PrepareHandoff(ctx, cloudlet.HandoffPrepare{ID: "short", Base: good.ID.String()})
	apiError(t, "a handoff ID that is not 32 hex digits", err, 400, "id")
	err = u.client.PrepareHandoff(ctx, cloudlet.HandoffPrepare{ID: hid, Base: strings.Repeat("ab", 32)})
	apiError(t, "a base this cloudlet lacks", err, 422, "base")
	err = u.client.PrepareHandoff(ctx, cloudlet.HandoffPrepare{ID: hid, Base: bare.ID.String()})
	apiError(t, "a base without vm.json", err, 422, "base")

	seg := []byte("a segment's stored bytes")
	sum := sha256.Sum256(seg)
	err = u.client.PutSegment(ctx, hid, hex.EncodeToString(sum[:]), seg)
	apiError(t, "a segment of a handoff never prepared", err, 404, "")
	_, err = u.client.Create(ctx, cloudlet.Request{Overlay: "http://127.0.0.1:1/x.overlay", Handoff: hid})
	apiError(t, "a VM of a handoff never prepared", err, 400, "handoff")

	if err := u.client.PrepareHandoff(ctx, cloudlet.HandoffPrepare{ID: hid, Base: good.ID.String()}); err != nil {
		t.Fatal(err)
	}
	other := sha256.Sum256([]byte("something else"))
	err = u.client.PutSegment(ctx, hid, hex.EncodeToString(other[:]), seg)
	apiError(t, "a segment whose bytes do not match its sha256", err, 400, "")
	if err := u.client.PutSegment(ctx, hid, hex.EncodeToString(sum[:]), seg); err != nil {
		t.Fatal(err)
	}
	if err := u.client.DeleteHandoff(ctx, hid); err != nil {
		t.Fatal(err)
	}
	err = u.client.PutSegment(ctx, hid, hex.EncodeToString(sum[:]), seg)
	apiError(t, "a segment of a handoff dropped", err, 404, "")

	// The source's side: the VM must exist and run, and the destination
	// must be a cloudlet's URL other than this one.
	_, err = u.client.Handoff(ctx, "nosuchvm", cloudlet.HandoffRequest{To: "http://127.0.0.1:1"})
	apiError(t, "a handoff of an unknown VM", err, 404, "")
}
