// Straight-line op programs run by the dispatcher, for ckpt_ext/traced.py: the block's forward or backward for one
// configuration, traced once (aten ops and ckpt_ext kernel ops), then replayed here without a Python call per op.
//
// program_build(ops, code, floats, strs) -> id. ops: "namespace::name" or "namespace::name.overload" per distinct
// operator. code: the program as ints:
//   header   n_slots, n_inputs, n_outputs, output slot..., n_instructions
//   per instruction   op index, n_args, args..., n_outs, out slot..., list_out (0/1), n_frees, freed slot...
//   an arg is a kind and its payload: SLOT s | INT v | FLOAT i (floats[i]) | BOOL v | NONE | INTS n v... |
//   SLOTS n s... (a Tensor[]) | STR i (strs[i]) | DEVICE i (strs[i], e.g. "cuda:0") |
//   NUMBER_INT v, NUMBER_FLOAT i (a Python number where the schema takes a Tensor, e.g. x * 0.5 traced as
//   aten::mul.Tensor: a 0-dim CPU tensor marked as a wrapped number, as Python's argument parser makes it, so type
//   promotion treats it as a scalar)
// Inputs occupy slots 0..n_inputs-1. Each instruction pushes its arguments (every schema argument, positional, in
// order) and calls the operator boxed; its results go to its out slots (list_out: the single Tensor[] result is
// spread over them); then the slots whose last use it was are released, so temporaries live as long as in eager.
// program_run(id, inputs) -> the output slots' tensors. program_free(id) drops a program.
// Device-agnostic: the operators dispatch on their tensors as any aten call does (CPU kernels, CUDA kernels).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace ckpt_ext {
namespace {

enum ArgKind : int64_t {
  SLOT = 0, INT = 1, FLOAT = 2, BOOL = 3, NONE = 4, INTS = 5, SLOTS = 6, STR = 7, DEVICE = 8,
  NUMBER_INT = 9, NUMBER_FLOAT = 10
};

at::Tensor wrapped_number(const at::Scalar& value) {
  at::Tensor t = at::scalar_to_tensor(value);
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

struct Instruction {
  explicit Instruction(c10::OperatorHandle handle) : op(std::move(handle)) {}
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;                     // constants in place, slot arguments as placeholders
  std::vector<std::pair<size_t, int64_t>> slot_args;  // (argument position, slot)
  std::vector<std::pair<size_t, std::vector<int64_t>>> list_args;  // (argument position, slots of a Tensor[])
  std::vector<int64_t> outs;
  bool list_out = false;
  std::vector<int64_t> frees;
};

struct Program {
  int64_t n_slots = 0, n_inputs = 0;
  std::vector<int64_t> outputs;
  std::vector<Instruction> code;
};

std::mutex registry_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Program>> registry;
int64_t next_id = 0;

class Reader {
 public:
  explicit Reader(const std::vector<int64_t>& code) : code_(code) {}
  int64_t next() {
    TORCH_CHECK(pos_ < code_.size(), "program_build: code ends early (at ", pos_, ")");
    return code_[pos_++];
  }
  std::vector<int64_t> next_n(int64_t n) {
    TORCH_CHECK(n >= 0, "program_build: negative count ", n);
    std::vector<int64_t> v;
    v.reserve(n);
    for (int64_t i = 0; i < n; ++i) v.push_back(next());
    return v;
  }
  bool done() const { return pos_ == code_.size(); }

 private:
  const std::vector<int64_t>& code_;
  size_t pos_ = 0;
};

int64_t checked_slot(int64_t s, int64_t n_slots) {
  TORCH_CHECK(s >= 0 && s < n_slots, "program_build: slot ", s, " outside [0, ", n_slots, ")");
  return s;
}

c10::OperatorHandle find_op(const std::string& full) {
  const auto dot = full.find('.');
  const std::string name = dot == std::string::npos ? full : full.substr(0, dot);
  const std::string overload = dot == std::string::npos ? "" : full.substr(dot + 1);
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
}

Instruction read_instruction(Reader& r, const std::vector<c10::OperatorHandle>& ops, const std::vector<double>& floats,
                             const std::vector<std::string>& strs, int64_t n_slots) {
  const int64_t op_index = r.next();
  TORCH_CHECK(op_index >= 0 && op_index < static_cast<int64_t>(ops.size()), "program_build: op index ", op_index);
  Instruction ins(ops[op_index]);
  const int64_t n_args = r.next();
  TORCH_CHECK(n_args == static_cast<int64_t>(ins.op.schema().arguments().size()), "program_build: ",
              ins.op.schema().name(), " takes ", ins.op.schema().arguments().size(), " arguments, got ", n_args);
  for (int64_t a = 0; a < n_args; ++a) {
    const int64_t kind = r.next();
    switch (kind) {
      case SLOT:
        ins.slot_args.emplace_back(ins.args.size(), checked_slot(r.next(), n_slots));
        ins.args.emplace_back();
        break;
      case INT:
        ins.args.emplace_back(r.next());
        break;
      case FLOAT:
        ins.args.emplace_back(floats.at(r.next()));
        break;
      case BOOL:
        ins.args.emplace_back(r.next() != 0);
        break;
      case NONE:
        ins.args.emplace_back();
        break;
      case INTS:
        ins.args.emplace_back(r.next_n(r.next()));
        break;
      case SLOTS: {
        std::vector<int64_t> slots = r.next_n(r.next());
        for (int64_t s : slots) checked_slot(s, n_slots);
        ins.list_args.emplace_back(ins.args.size(), std::move(slots));
        ins.args.emplace_back();
        break;
      }
      case STR:
        ins.args.emplace_back(strs.at(r.next()));
        break;
      case DEVICE:
        ins.args.emplace_back(c10::Device(strs.at(r.next())));
        break;
      case NUMBER_INT:
        ins.args.emplace_back(wrapped_number(at::Scalar(r.next())));
        break;
      case NUMBER_FLOAT:
        ins.args.emplace_back(wrapped_number(at::Scalar(floats.at(r.next()))));
        break;
      default:
        TORCH_CHECK(false, "program_build: unknown argument kind ", kind);
    }
  }
  for (int64_t s : r.next_n(r.next())) ins.outs.push_back(checked_slot(s, n_slots));
  ins.list_out = r.next() != 0;
  for (int64_t s : r.next_n(r.next())) ins.frees.push_back(checked_slot(s, n_slots));
  return ins;
}

int64_t program_build(std::vector<std::string> op_names, std::vector<int64_t> code, std::vector<double> floats,
                      std::vector<std::string> strs) {
  std::vector<c10::OperatorHandle> ops;
  ops.reserve(op_names.size());
  for (const auto& name : op_names) ops.push_back(find_op(name));
  auto program = std::make_shared<Program>();
  Reader r(code);
  program->n_slots = r.next();
  program->n_inputs = r.next();
  TORCH_CHECK(program->n_inputs >= 0 && program->n_inputs <= program->n_slots, "program_build: bad input count");
  for (int64_t s : r.next_n(r.next())) program->outputs.push_back(checked_slot(s, program->n_slots));
  const int64_t n_code = r.next();
  for (int64_t i = 0; i < n_code; ++i) program->code.push_back(read_instruction(r, ops, floats, strs, program->n_slots));
  TORCH_CHECK(r.done(), "program_build: trailing code");
  std::lock_guard<std::mutex> lock(registry_mutex);
  const int64_t id = next_id++;
  registry.emplace(id, std::move(program));
  return id;
}

std::vector<at::Tensor> program_run(int64_t id, std::vector<at::Tensor> inputs) {
  std::shared_ptr<const Program> program;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry.find(id);
    TORCH_CHECK(it != registry.end(), "program_run: no program ", id, " (freed?)");
    program = it->second;
  }
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == program->n_inputs, "program_run: program ", id, " takes ",
              program->n_inputs, " inputs, got ", inputs.size());
  std::vector<c10::IValue> slots(program->n_slots);
  for (size_t i = 0; i < inputs.size(); ++i) slots[i] = std::move(inputs[i]);
  torch::jit::Stack stack;
  for (const Instruction& ins : program->code) {
    stack.assign(ins.args.begin(), ins.args.end());
    for (const auto& [pos, slot] : ins.slot_args) stack[pos] = slots[slot];
    for (const auto& [pos, list] : ins.list_args) {
      c10::List<at::Tensor> tensors;
      tensors.reserve(list.size());
      for (int64_t s : list) tensors.push_back(slots[s].toTensor());
      stack[pos] = std::move(tensors);
    }
    ins.op.callBoxed(stack);
    if (ins.list_out) {
      const c10::List<at::Tensor> result = stack.at(0).toTensorList();
      TORCH_CHECK(result.size() == ins.outs.size(), "program_run: ", ins.op.schema().name(), " returned ",
                  result.size(), " tensors, the trace had ", ins.outs.size());
      for (size_t j = 0; j < ins.outs.size(); ++j) slots[ins.outs[j]] = result.get(j);
    } else {
      TORCH_CHECK(stack.size() == ins.outs.size(), "program_run: ", ins.op.schema().name(), " returned ",
                  stack.size(), " values, the trace had ", ins.outs.size());
      for (size_t j = 0; j < ins.outs.size(); ++j) slots[ins.outs[j]] = std::move(stack[j]);
    }
    for (int64_t s : ins.frees) slots[s] = c10::IValue();
  }
  std::vector<at::Tensor> outputs;
  outputs.reserve(program->outputs.size());
  for (int64_t s : program->outputs) outputs.push_back(slots[s].toTensor());
  return outputs;
}

void program_free(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(id);
}

}  // namespace
}  // namespace ckpt_ext

TORCH_LIBRARY_FRAGMENT(ckpt_ext, m) {
  m.def("program_build(str[] ops, int[] code, float[] floats, str[] strs) -> int", &ckpt_ext::program_build);
  m.def("program_run(int id, Tensor[] inputs) -> Tensor[]", &ckpt_ext::program_run);
  m.def("program_free(int id) -> ()", &ckpt_ext::program_free);
}
